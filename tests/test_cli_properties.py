"""Property suite of the `scgene` command line (hypothesis): generated bad inputs — a log-scaled X with the counts in a
layer or `.raw`, non-integer or negative values, small gene panels, Ensembl ids, duplicated gene or cell names,
all-zero cells, no cells at all, damaged checkpoints — against `embed`, `annotate`, `evaluate`, `tokenize` and
`build-prior`, run in-process through `scgene.cli.main`.

Every run ends one of two ways: exit status 0 with a correct result (the declared output, one row per input cell,
nothing NaN, and a warning carrying the numbers where the input was ambiguous), or a non-zero status with one line on
stderr, `scgene COMMAND: error: ...`, that names the fix, and no traceback. Either way every input file is
byte-identical afterwards and nothing but the declared output appeared in (or left) the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from scgene import ScGeneTokenizer
from scgene.cli import main
from scgene.inference import UNKNOWN_LABEL
from test_inference import tiny

PBMC = Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
HIDDEN_SIZE = 32  # of the tiny checkpoint (tests/test_inference.py)
# words by which an error message names what to do about it
FIX_WORDS = ("pass ", "use ", "choose ", "check ", "remove ", "give ", "rebuild", "save ", "drop ", "put ", "lower ",
             "fine-tune", "leave ", "end it", "name ", "store ")


# ---------------------------------------------------------------------------------------------------------- inputs
@dataclass
class CellsCase:
    """A generated .h5ad and what is ambiguous or wrong about it."""

    adata: ad.AnnData
    scale: str  # how X holds the expression (see SCALES)
    panel: str
    zero_cells: int
    flag: list[str] = field(default_factory=list)  # --layer counts / --use-raw, or nothing

    @property
    def counts_elsewhere(self) -> bool:
        """X is log-scaled while the counts sit in layers['counts'] or .raw."""
        return self.scale in ("log1p_cpm_counts_in_layer", "log2_cp10k_counts_in_raw")

    def expression(self):
        """The matrix the command reads: X, or what --layer / --use-raw names."""
        if self.flag == ["--use-raw"]:
            return self.adata.raw.X
        return self.adata.layers["counts"] if self.flag else self.adata.X

    @property
    def flag_reads_counts(self) -> bool:
        return (self.flag == ["--layer", "counts"] and "counts" in self.adata.layers) or (
            self.flag == ["--use-raw"] and self.adata.raw is not None)


SCALES = ("counts", "log1p_cpm_counts_in_layer", "log2_cp10k_counts_in_raw", "non_integer", "negative")
PANELS = {"whole": None, "50 genes": 50, "random 10%": 200}


class BaseCells:
    """60 real PBMC 3k cells (raw counts, 2000 genes, obs.cell_type) and their genes' Ensembl ids (symbols where the
    vocabulary has no match)."""

    def __init__(self, adata: ad.AnnData, ensembl_ids: list[str]):
        self.adata, self.ensembl_ids = adata, ensembl_ids

    def __repr__(self) -> str:
        return f"BaseCells({self.adata.n_obs} x {self.adata.n_vars})"


@pytest.fixture(scope="module")
def pbmc_cells() -> BaseCells:
    cells = ad.read_h5ad(PBMC)[:60].copy()
    del cells.layers["lognorm_original"]
    tokenizer = ScGeneTokenizer()
    mapping = tokenizer.map_genes(cells)
    ensembl = [tokenizer.ensembl_ids[mapping.vocab_ids[index]] if index >= 0 else name
               for name, index in zip(cells.var_names, mapping.column_to_matched)]
    return BaseCells(cells, ensembl)


@st.composite
def cells_cases(draw, pbmc_cells: BaseCells) -> CellsCase:
    base, ensembl = pbmc_cells.adata, pbmc_cells.ensembl_ids
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n_cells = draw(st.sampled_from([0, 1, 40, 60]))
    adata = base[:n_cells].copy()
    panel = draw(st.sampled_from(sorted(PANELS)))
    if PANELS[panel]:
        adata = adata[:, np.sort(rng.choice(adata.n_vars, PANELS[panel], replace=False))].copy()
    if draw(st.booleans()):
        adata.var_names = [ensembl[base.var_names.get_loc(name)] for name in adata.var_names]
    if draw(st.booleans()):  # a gene listed twice (e.g. two probes, or symbols made unique by hand and undone)
        names = list(adata.var_names)
        names[1] = names[0]
        adata.var_names = names
    if n_cells > 1 and draw(st.booleans()):
        names = list(adata.obs_names)
        names[1] = names[0]
        adata.obs_names = names
    zero_cells = draw(st.integers(0, min(3, n_cells)))
    counts = adata.X.toarray()
    counts[:zero_cells] = 0
    scale = draw(st.sampled_from(SCALES))
    totals = np.maximum(counts.sum(axis=1, keepdims=True), 1)
    matrix = {
        "counts": counts,
        "log1p_cpm_counts_in_layer": np.log1p(counts / totals * 1e6),
        "log2_cp10k_counts_in_raw": np.log2(counts / totals * 1e4 + 1),
        "non_integer": counts * 0.37,
        "negative": counts - counts.mean(axis=0),
    }[scale]
    if scale == "log1p_cpm_counts_in_layer":
        adata.layers["counts"] = sp.csr_matrix(counts)
    if scale == "log2_cp10k_counts_in_raw":
        adata.raw = ad.AnnData(sp.csr_matrix(counts), var=adata.var.copy())
    adata.X = sp.csr_matrix(matrix.astype(np.float32))
    matching_flag = {"log1p_cpm_counts_in_layer": ["--layer", "counts"], "log2_cp10k_counts_in_raw": ["--use-raw"]}
    flag = draw(st.one_of(st.just(matching_flag.get(scale, [])), st.sampled_from([[], ["--layer", "counts"], ["--use-raw"]])))
    return CellsCase(adata, scale, panel, zero_cells, flag)


# ----------------------------------------------------------------------------------------------------- checkpoints
CHECKPOINT_DAMAGE = ("intact", "truncated weights", "one layer more", "twice the hidden size",
                     "no preprocessor_config.json", "mistyped path")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny cell-type classifier on the default vocabulary (max_length 128) and damaged copies of it."""
    root = tmp_path_factory.mktemp("checkpoints")
    intact = root / "intact"
    tiny(ScGeneTokenizer().vocab_size).save_pretrained(intact)
    ScGeneTokenizer(max_length=128).save_pretrained(intact)
    folders = {"intact": intact, "mistyped path": root / "intcat"}
    config = json.loads((intact / "config.json").read_text())
    for damage, edit in (("one layer more", {"num_hidden_layers": config["num_hidden_layers"] + 1}),
                         ("twice the hidden size", {"hidden_size": 2 * config["hidden_size"]}),
                         ("truncated weights", {}), ("no preprocessor_config.json", {})):
        folders[damage] = shutil.copytree(intact, root / damage.replace(" ", "_"))
        (folders[damage] / "config.json").write_text(json.dumps(config | edit))
    weights = (intact / "model.safetensors").read_bytes()
    (folders["truncated weights"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (folders["no preprocessor_config.json"] / "preprocessor_config.json").unlink()
    return folders


# ------------------------------------------------------------------------------------------------------ running
@dataclass
class Run:
    status: int
    out: str
    err: str


def run_cli(argv: list[str]) -> Run:
    """`scgene ARGV` in this process: its exit status (a SystemExit's, as the interpreter would give it), stdout and
    stderr. Any other exception escaping the command is a failure of the property, shown with its traceback."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(argv)
        except SystemExit as stop:
            if isinstance(stop.code, str):
                print(stop.code, file=stderr)
            status = 1 if isinstance(stop.code, str) else stop.code or 0
        except Exception:  # noqa: BLE001 - the property: no traceback reaches the user
            pytest.fail(f"scgene {' '.join(argv)} raised instead of a one-line error:\n{traceback.format_exc()}")
    return Run(status, stdout.getvalue(), stderr.getvalue())


def folder_state(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> SHA-256), folders as entries of their own."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            for path in sorted(folder.rglob("*"))}


def assert_one_line_error(run: Run, command: str) -> None:
    """A failed run: its last line of stderr is `scgene COMMAND: error: ...` naming the fix, with nothing after it and
    no traceback before it (warnings and progress bars may come first)."""
    lines = [line for line in run.err.replace("\r", "\n").splitlines() if line.strip()]
    assert run.status != 0 and lines, run
    assert "Traceback" not in run.err, run.err
    message = lines[-1]
    assert message.startswith(f"scgene {command}: error: "), run.err
    assert any(word in message.lower() for word in FIX_WORDS), f"names no fix: {message}"


def command_line(command: str, source: Path, output: Path, model: Path, flag: list[str]) -> list[str]:
    """`scgene COMMAND` on `source` into `output`, small and fast settings."""
    return {
        "embed": ["embed", str(source), "--model", str(model), "--out", str(output), *flag],
        "annotate": ["annotate", str(source), "--model", str(model), "--out", str(output), *flag],
        "evaluate": ["evaluate", str(source), "--model", str(model), "--label-key", "cell_type", "--baselines", "pca",
                     "--n-neighbors", "5", "--json", str(output), *flag],
        "tokenize": ["tokenize", str(source), str(output), *flag],
        "build-prior": ["build-prior", "--adata", str(source), "--model", str(model), "--out", str(output),
                        "--no-knowledge", "--gene2vec-dim", "4", "--epochs", "1", "--threshold", "0.3",
                        "--no-progress"],
    }[command]


OUTPUT_NAMES = {"embed": "out.h5ad", "annotate": "out.h5ad", "evaluate": "scores.json", "tokenize": "tokens",
                "build-prior": "prior"}


@contextlib.contextmanager
def run_in_fresh_folder(command: str, adata: ad.AnnData, model: Path, flag: list[str], model_folders: list[Path]):
    """Write `adata` to a new folder, run the command there and check the rule on inputs and outputs: the input and
    the model folders are unchanged, and the folder gained the declared output on success, nothing on failure.
    Yields the run and the output's path (which exists until the block ends)."""
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        source, output = workdir / "in.h5ad", workdir / OUTPUT_NAMES[command]
        adata.write_h5ad(source)
        before = folder_state(workdir)
        models_before = [folder_state(folder) for folder in model_folders]
        run = run_cli(command_line(command, source, output, model, flag))
        after = folder_state(workdir)
        assert [folder_state(folder) for folder in model_folders] == models_before, "a model folder changed"
        assert {name: after.get(name) for name in before} == before, "an input changed or disappeared"
        new = {name.split("/")[0] for name in set(after) - set(before)}
        assert new == ({output.name} if run.status == 0 else set()), (new, run)
        yield run, output


# ------------------------------------------------------------------------------------------------ correct results
def assert_correct_result(command: str, case: CellsCase, run: Run, output: Path) -> None:
    """What a successful run must have written, and said, for the input it was given."""
    cells = case.adata
    if command in ("embed", "annotate"):
        written = ad.read_h5ad(output)
        assert list(written.obs_names) == list(cells.obs_names) and written.n_vars == cells.n_vars
        if command == "embed":
            embedding = written.obsm["X_scgene"]
            assert embedding.shape == (cells.n_obs, HIDDEN_SIZE) and np.isfinite(embedding).all()
        else:
            labels, confidence = written.obs["scgene_label"], written.obs["scgene_label_confidence"].to_numpy()
            assert labels.notna().all() and np.isfinite(confidence).all() and ((confidence >= 0) & (confidence <= 1)).all()
            assert (labels.iloc[: case.zero_cells] == UNKNOWN_LABEL).all()  # all-zero cells get no cell type
        record = written.uns["X_scgene" if command == "embed" else "scgene_label"]
        assert record["model"] and "genes matched the vocabulary" in record["gene_coverage"]
    elif command == "evaluate":
        scores = json.loads(output.read_text())
        assert scores, "an empty report"
    elif command == "tokenize":
        import datasets

        tokens = datasets.load_from_disk(str(output))
        assert len(tokens) == cells.n_obs
        assert all(np.isfinite(np.asarray(values)).all() for values in tokens["expression_values"])
    elif command == "build-prior":
        from safetensors.numpy import load_file

        prior = load_file(output / "gene_prior.safetensors")["gene_prior"]
        assert prior.shape[1] == HIDDEN_SIZE and np.isfinite(prior).all()
    if command != "build-prior" and cells.n_obs:
        assert_warned_where_ambiguous(command, case, run)


def assert_warned_where_ambiguous(command: str, case: CellsCase, run: Run) -> None:
    """Ambiguous inputs that may go through must be reported with their numbers, or the way out named; the gene
    coverage is shown by every command that tokenizes, and no 'Loading weights' bar."""
    assert "Gene coverage: " in run.err and "Loading weights" not in run.err, run.err
    if case.counts_elsewhere and not case.flag and case.adata.X.nnz:  # (all-zero values show no scale)
        expected_flag = "--layer counts" if "counts" in case.adata.layers else "--use-raw"
        named_scale = "log1p-normalised" in run.err or "log2(x + 1)-normalised" in run.err  # the scale it was read as
        assert named_scale and expected_flag in run.err, run.err
    matched = ScGeneTokenizer().map_genes(case.adata).coverage.n_matched_genes
    assert f"The input measures {matched} of the vocabulary's" in run.err, run.err  # 2000 genes or fewer: a panel
    empty = int((np.asarray(case.expression().sum(axis=1)).ravel() == 0).sum())  # the zeroed cells, and any others
    if empty:  # evaluate scores (and counts) only the cells of labels with enough cells
        of_cells = r"\d+" if command == "evaluate" else f"{empty} of {case.adata.n_obs}"
        assert re.search(f"{of_cells} cells have no counts at all", run.err), run.err


# ------------------------------------------------------------------------------------------------------ properties
COMMANDS = ("embed", "annotate", "evaluate", "tokenize", "build-prior")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_bad_cells_give_a_correct_result_or_a_one_line_error(data, pbmc_cells, checkpoints):
    case = data.draw(cells_cases(pbmc_cells), label="cells")
    command = data.draw(st.sampled_from(COMMANDS), label="command")
    flag = [] if command == "build-prior" else case.flag  # build-prior reads X (no --layer / --use-raw)
    case.flag = flag
    with run_in_fresh_folder(command, case.adata, checkpoints["intact"], flag, [checkpoints["intact"]]) as (run, output):
        event(f"{command}: {'result' if run.status == 0 else 'error'}")
        if run.status != 0:
            assert_one_line_error(run, command)
            return
        assert not (case.adata.X < 0).nnz, "negative values were taken as expression"
        assert case.flag_reads_counts or not flag, "--layer / --use-raw named a matrix the file lacks"
        assert_correct_result(command, case, run, output)


@pytest.mark.parametrize("damage", CHECKPOINT_DAMAGE)
@pytest.mark.parametrize("command", ["embed", "annotate", "evaluate", "build-prior"])
def test_damaged_checkpoints_give_a_one_line_error(command, damage, pbmc_cells, checkpoints):
    """Only the intact checkpoint gives a result (build-prior reads no tokenizer from the model: its missing
    preprocessor_config.json does not matter there)."""
    case = CellsCase(pbmc_cells.adata[:40].copy(), "counts", "whole", 0)
    model_folders = [folder for folder in checkpoints.values() if folder.exists()]
    with run_in_fresh_folder(command, case.adata, checkpoints[damage], [], model_folders) as (run, output):
        if damage == "intact" or (damage == "no preprocessor_config.json" and command == "build-prior"):
            assert run.status == 0, run
            assert_correct_result(command, case, run, output)
        else:
            assert_one_line_error(run, command)


# ------------------------------------------------------------------ regressions: what the properties found, one each
def test_build_prior_refuses_a_file_with_too_few_cells_for_a_network(pbmc_cells, tmp_path):
    """Was: `Pearson correlation needs at least 2 cells, got 1.` (no fix named); 0 cells: `nothing to preprocess.`"""
    for n_cells in (0, 1):
        source = tmp_path / f"{n_cells}.h5ad"
        pbmc_cells.adata[:n_cells].write_h5ad(source)
        run = run_cli(["build-prior", "--adata", str(source), "--no-knowledge", "--out", str(tmp_path / "prior")])
        assert_one_line_error(run, "build-prior")
        assert f"has {n_cells} cells, and a co-expression network needs at least 2" in run.err
    assert not (tmp_path / "prior").exists()


def test_the_counts_of_a_small_panel_are_named_next_to_a_log_scaled_x(pbmc_cells, tmp_path):
    """Was: a layer of counts was only recognised with more than 100 counts per cell, so a small panel's counts layer
    went unnamed and the log values were tokenized as they were."""
    panel = pbmc_cells.adata[:20, 200:250].copy()  # a few counts per cell
    assert panel.X.sum(axis=1).max() < 100
    panel.layers["counts"] = panel.X.copy()
    panel.X = sp.csr_matrix(np.log1p(panel.X.toarray()))
    source = tmp_path / "panel.h5ad"
    panel.write_h5ad(source)
    run = run_cli(["embed", str(source), "--out", str(tmp_path / "out.h5ad")])
    assert run.status == 0 and "Raw counts seem to be there too: pass layer='counts' (--layer counts)" in run.err


def test_missing_layer_or_raw_errors_name_what_to_read_instead(pbmc_cells, tmp_path):
    """Was: `--use-raw, but adata.raw is None: the counts are in X or a layer (pass --layer ).`"""
    cells = pbmc_cells.adata[:20].copy()
    cells.layers["spliced"] = cells.X.copy()
    source = tmp_path / "in.h5ad"
    cells.write_h5ad(source)
    run = run_cli(["tokenize", str(source), str(tmp_path / "tokens"), "--use-raw"])
    assert_one_line_error(run, "tokenize")
    assert run.err.endswith("leave out --use-raw to read X, or read a layer (one of ['spliced']: --layer NAME).\n")
    run = run_cli(["tokenize", str(source), str(tmp_path / "tokens"), "--layer", "counts"])
    assert_one_line_error(run, "tokenize")
    assert "(it has ['spliced']); pass one of those, or leave out the layer to read X." in run.err


def test_evaluate_with_too_few_labelled_cells_counts_them_and_names_the_fix(pbmc_cells, tmp_path, checkpoints):
    """Was: `obs['cell_type'] needs at least two labels with 5+ cells each to evaluate against.`"""
    source = tmp_path / "in.h5ad"
    pbmc_cells.adata[:3].write_h5ad(source)
    run = run_cli(["evaluate", str(source), "--model", str(checkpoints["intact"]), "--label-key", "cell_type"])
    assert_one_line_error(run, "evaluate")
    assert "over 3 cells. Pass more labelled cells, or another --label-key." in run.err


def test_the_api_with_progress_off_prints_nothing(pbmc_cells, checkpoints, capfd):
    """progress=False is quiet: no 'Loading weights' bar from transformers."""
    import scgene

    capfd.readouterr()
    scgene.embed(pbmc_cells.adata[:10].copy(), checkpoints["intact"], progress=False)
    assert "Loading weights" not in capfd.readouterr().err


def test_from_anndata_keeps_a_symbol_and_its_former_alias_apart():
    """Was (bb31448): `Ensembl id ENSG00000196498 appears twice in the vocabulary.` for a file holding TRAC and NCOR2,
    TRAC being an alias of NCOR2 in the default vocabulary; the same alias summed TRAC's counts into NCOR2."""
    cells = ad.AnnData(np.array([[738.0, 18.0, 5.0]]), var=pd.DataFrame(index=["TRAC", "NCOR2", "CD3E"]))
    own = ScGeneTokenizer.from_anndata(cells)
    assert len(set(own.convert_genes_to_ids(["TRAC", "NCOR2", "CD3E"]))) == 3
    default = ScGeneTokenizer()
    tokens = default.with_settings(min_coverage=0.0)(cells, return_tensors="np")["input_ids"][0][1:]
    assert sorted(default.convert_ids_to_genes(tokens.tolist())) == ["CD3E", "NCOR2", "TRAC"]
