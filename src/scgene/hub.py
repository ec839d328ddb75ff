"""Publishing a checkpoint: a model card made from measurements, and one Hub commit with everything a user needs.

`model_card(folder, evaluations=..., transfer=...)` writes the card from what was measured: `model-index` results
(huggingface_hub's `EvalResult`) for ScGene on each evaluated set, the baselines of the same run in the text, the
recipe's leave-one-dataset-out tables (`scgene.transfer`), the training data with their licences and the recipe from
the checkpoint's `build_record.json` (`training_record`, written by examples/pretrain_masked_expression.py and
scripts/build_default_checkpoint.py), and the limits read off the numbers (where ScGene loses to 50 PCs or to its own
prior). `push(folder, repo_id)` uploads the weights, the remote code, the tokenizer with its vocabulary, the
`cell-embedding` pipeline and that card in a single commit; transformers' own `push_to_hub` would write its default
card over README.md. `publishable_files(folder)` is that set of files.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData

from .transfer import SCGENE_ROW, finite_values, metric_tables, read_runs, scgene_row, scores_by_fold

CARD_NAME = "README.md"
BUILD_RECORD = "build_record.json"
NOT_RECORDED = "not recorded"
REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
PCA_ROW, PRIOR_ROW = "PCA (50 PCs of log1p HVGs)", "prior only"
ATLAS_SCALE_CELLS = 1_000_000  # atlas-scale single-cell models pretrain on tens of millions of cells
# metric key of `scgene evaluate` -> (model-index metric type, readable name)
CARD_METRICS = {
    "knn_f1": ("f1", "kNN macro-F1 (k=15, 5-fold)"),
    "logreg_f1": ("f1", "logistic-regression macro-F1 (5-fold)"),
    "kmeans_ari": ("adjusted_rand_score", "KMeans ARI"),
    "leiden_ari": ("adjusted_rand_score", "Leiden ARI"),
    "label_pc1_corr_genes": ("pearsonr", "within-label |r| of PC1 with genes detected (lower is better)"),
}
LIMIT_METRICS = ("knn_f1", "logreg_f1", "kmeans_ari", "leiden_ari")


def checked_checkpoint(folder) -> Path:
    """A folder that holds a saved ScGene checkpoint with its tokenizer and remote code, or a clear error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the checkpoint folder that save_pretrained wrote.")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: a checkpoint to publish needs the weights, config and "
                                "tokenizer (model.save_pretrained(folder) and tokenizer.save_pretrained(folder)).")
    auto_map = json.loads((folder / "config.json").read_text()).get("auto_map", {})
    code = sorted({reference.split(".")[0] + ".py" for reference in auto_map.values()})
    if not code or any(not (folder / name).is_file() for name in code):
        raise FileNotFoundError(f"{folder} lacks the remote code its config names ({code or 'no auto_map'}): save the "
                                "model with scgene imported, which registers the classes for the Auto API.")
    return folder


def git_commit(source: str | os.PathLike = Path(__file__).parent) -> str | None:
    """The commit checked out where git tracks `source` (default: this package's code); None where it does not (an
    installed package, no git)."""

    def git(*arguments: str) -> str | None:
        try:
            result = subprocess.run(["git", *arguments], cwd=source, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    if git("ls-files", "--error-unmatch", ".") is None:  # untracked, e.g. installed into a venv inside a checkout
        return None
    return git("rev-parse", "HEAD") or None


def training_record(*, corpus: list[dict], pretraining_flags: Sequence, steps: int, seed: int, build_seconds: float,
                    devices: str | None = None) -> dict:
    """A checkpoint's `build_record.json`, with the keys `model_card` renders: `corpus` (a row per training input:
    file, cells, licence), `pretraining_flags`, `steps`, `seed`, `build_seconds` (wall time of the build), `machine`
    (this one; with `devices`, e.g. "2 x NVIDIA H100", where training did not run on the CPU), `scgene_version` and
    `git_commit` (None outside a git checkout)."""
    from . import __version__

    machine = f"{platform.platform()}, {os.cpu_count()} CPU cores" + (f", trained on {devices}" if devices else "")
    return {"corpus": corpus, "pretraining_flags": [str(flag) for flag in pretraining_flags], "steps": steps,
            "seed": seed, "build_seconds": round(build_seconds, 1), "machine": machine, "scgene_version": __version__,
            "git_commit": git_commit()}


def tokenized_corpus(folders: Sequence, licences: Sequence[str] = ()) -> list[dict]:
    """The `corpus` rows of a training record for `scgene tokenize` folders: a row per source file where a folder has
    a `source` column (several files tokenized together), else a row for the folder. `licences`: one for every
    folder, one per folder in their order, or none ("not recorded")."""
    import datasets

    if len(licences) not in (0, 1, len(folders)):
        raise ValueError(f"{len(licences)} licences for {len(folders)} datasets: give one licence for all of them, or "
                         "one per dataset in the order of the datasets.")
    rows = []
    for index, folder in enumerate(folders):
        licence = licences[index] if len(licences) == len(folders) else licences[0] if licences else NOT_RECORDED
        cells = datasets.load_from_disk(str(folder))
        if "source" not in cells.column_names:
            rows.append({"file": str(folder), "cells": cells.num_rows, "licence": licence})
            continue
        feature = cells.features["source"]
        name = feature.int2str if isinstance(feature, datasets.ClassLabel) else str
        for count in cells.data.column("source").value_counts().to_pylist():  # in order of first appearance
            rows.append({"file": name(count["values"]), "dataset": str(folder), "cells": count["counts"],
                         "licence": licence})
    return rows


def pipeline_code() -> dict[str, bytes]:
    """`pipeline_scgene.py` and the package modules it imports (inference, tokenizer, model, ...): the remote code that
    `pipeline("cell-embedding", model=REPO, trust_remote_code=True)` fetches with it."""
    from transformers.dynamic_module_utils import get_relative_import_files

    from . import pipeline_scgene

    files = [pipeline_scgene.__file__, *get_relative_import_files(pipeline_scgene.__file__)]
    return {Path(file).name: Path(file).read_bytes() for file in files}


def config_with_pipeline(config: dict) -> dict:
    """The checkpoint's config naming the custom pipeline, as `Pipeline.save_pretrained` would write it."""
    from .pipeline_scgene import TASK, CellEmbeddingPipeline

    task = {"impl": f"pipeline_scgene.{CellEmbeddingPipeline.__name__}", "pt": ["AutoModel"]}
    return config | {"custom_pipelines": {**config.get("custom_pipelines", {}), TASK: task}}


def publishable_files(folder) -> dict[str, Path | bytes]:
    """What a published checkpoint holds, by name: every file of `folder` (a path; not hidden ones, not its README.md:
    the card is made apart), its config naming the `cell-embedding` pipeline, and the pipeline's code (contents)."""
    folder = checked_checkpoint(folder)
    files: dict[str, Path | bytes] = {path.name: path for path in sorted(folder.iterdir())
                                      if path.is_file() and not path.name.startswith(".") and path.name != CARD_NAME}
    config = config_with_pipeline(json.loads((folder / "config.json").read_text()))
    files["config.json"] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return files | pipeline_code()


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _parameters(folder: Path) -> tuple[int, int]:
    """(trained parameters, frozen prior entries) from the safetensors header."""
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as weights:
        sizes = {name: math.prod(weights.get_slice(name).get_shape()) for name in weights.keys()}
    prior = sum(size for name, size in sizes.items() if name.endswith("gene_prior.weight"))
    return sum(sizes.values()) - prior, prior


def _score_table(name: str, rows: dict) -> list[str]:
    lines = [f"**{name}**", "", "| embedding | " + " | ".join(CARD_METRICS) + " |", "|---" * (len(CARD_METRICS) + 1) + "|"]
    for row, scores in rows.items():
        cells = [f"{scores[m]:.3f}" if _finite(scores.get(m)) else "–" for m in CARD_METRICS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines + [""]


def _limits(evaluations: dict) -> list[str]:
    """One line per set and metric where ScGene scores below 50 PCs or its own prior."""
    lines = []
    for dataset, rows in evaluations.items():
        ours = rows.get(SCGENE_ROW, {})
        for baseline in (PCA_ROW, PRIOR_ROW):
            for metric in LIMIT_METRICS:
                theirs = rows.get(baseline, {}).get(metric)
                if _finite(ours.get(metric)) and _finite(theirs) and ours[metric] < theirs:
                    lines.append(f"- {dataset}: {CARD_METRICS[metric][1]} {ours[metric]:.3f}, below {baseline} "
                                 f"({theirs:.3f}).")
    return lines


def _recorded(value, template: str = "{}") -> str:
    """`value` through `template`, or "not recorded" where the record has none (missing, None, empty, NaN)."""
    if value is None or value == "" or (isinstance(value, float) and not math.isfinite(value)):
        return NOT_RECORDED
    return template.format(value)


def _training_sections(folder: Path, record: dict) -> list[str]:
    """"Training data" and "Training record" from `build_record.json`, saying "not recorded" for what it lacks."""
    if not record:
        return ["## Training data", "", f"Not recorded: {folder.name} has no {BUILD_RECORD} (examples/"
                "pretrain_masked_expression.py writes one next to the weights).", ""]
    corpus = record.get("corpus") or []
    table = ["| file | cells | licence |", "|---|---|---|",
             *[f"| {_recorded(row.get('file'))} | {_recorded(row.get('cells'))} | {_recorded(row.get('licence'))} |"
               for row in corpus]]
    flags = " ".join(map(str, record.get("pretraining_flags") or []))
    return ["## Training data", "", *(table if corpus else [f"Not recorded in {BUILD_RECORD}."]), "",
            "## Training record", "",
            f"- recipe (pretraining flags): {_recorded(flags, '`{}`')}",
            f"- steps: {_recorded(record.get('steps'))}; seed: {_recorded(record.get('seed'))}",
            *([f"- prior read-out: the cell embedding adds the prior, pooled like the gene states, with weight "
               f"{record['prior_readout_weight']:.3f} (`prior_readout_weight`, fitted on the corpus by "
               "`scgene.fit_prior_readout_weight`)"] if record.get("prior_readout_weight") else []),
            f"- wall time of the build: {_recorded(record.get('build_seconds'), '{:.0f} s')}; machine: "
            f"{_recorded(record.get('machine'))}",
            f"- scgene version: {_recorded(record.get('scgene_version'))}; git commit: "
            f"{_recorded(record.get('git_commit'))}", ""]


def _corpus_limit(record: dict) -> str:
    """The limit line on the corpus size, from the record's cells."""
    cells = [row.get("cells") for row in record.get("corpus") or []]
    if not cells or not all(isinstance(count, int) for count in cells):
        return "- The training corpus is not recorded."
    small = ": a small corpus, not an atlas-scale model" if sum(cells) < ATLAS_SCALE_CELLS else ""
    return f"- Pretrained on {sum(cells):,} cells (see Training data){small}."


LABEL_TRANSFER_COLUMNS = {"f1": "macro-F1", "accuracy": "accuracy", "unknown_rate_known_types": "Unknown, known types",
                          "unknown_rate_novel_types": "Unknown, novel types"}
LABEL_TRANSFER_ROW = "ScGene embedding of the shared genes + logistic regression"  # what scgene.transfer_labels does
EXPRESSION_ANNOTATOR_ROW = "expression + logistic regression"


def _label_transfer_section(record: dict) -> list[str]:
    """The record's annotation transfer (reference -> query, per annotator) as tables; nothing where none was scored."""
    scores = record.get("label_transfer") or {}
    if not scores:
        return []
    lines = ["## Label transfer", "",
             "`scgene.transfer_labels(query, reference, label_key=...)` (`scgene annotate QUERY --reference REF "
             "--label-key COL`) embeds both files on the genes they share and labels the query with a calibrated "
             "logistic regression on the reference's embeddings; cells farther from the reference than 95% of "
             "held-out reference cells are \"Unknown\". Scored with a labelled reference on a query set the checkpoint "
             "never saw, next to annotators on expression; macro-F1 and accuracy of the best type on the query's cells "
             "of types the reference has, and the share called \"Unknown\" once the reference's B cells are withheld "
             "(the query's B cells are then a type it lacks).", ""]
    for query, result in scores.items():
        lines += [f"**{_recorded(result.get('reference'))} → {query}** ({_recorded(result.get('cells'))} query cells, "
                  f"{_recorded(result.get('genes_shared'))} genes shared)", "",
                  "| annotator | " + " | ".join(LABEL_TRANSFER_COLUMNS.values()) + " |",
                  "|---" * (len(LABEL_TRANSFER_COLUMNS) + 1) + "|"]
        for name, values in result.items():
            if isinstance(values, dict):
                lines.append(f"| {name} | " + " | ".join(f"{values[key]:.3f}" if _finite(values.get(key)) else "–"
                                                         for key in LABEL_TRANSFER_COLUMNS) + " |")
        lines.append("")
    return lines


def _label_transfer_limits(record: dict) -> list[str]:
    """A line per query where `transfer_labels`' macro-F1 is below logistic regression on expression."""
    lines = []
    for query, result in (record.get("label_transfer") or {}).items():
        ours = result.get(LABEL_TRANSFER_ROW, {}).get("f1")
        theirs = result.get(EXPRESSION_ANNOTATOR_ROW, {}).get("f1")
        if _finite(ours) and _finite(theirs) and ours < theirs:
            lines.append(f"- Label transfer {result.get('reference')} → {query}: macro-F1 {ours:.3f}, below logistic "
                         f"regression on expression ({theirs:.3f}).")
    return lines


def _transfer_section(runs: list[dict]) -> list[str]:
    return ["## Leave-one-dataset-out transfer", "",
            "How the recipe transfers (`scripts/leave_one_dataset_out.py`): for each labelled set, a model is "
            "pretrained with the recipe, its prior included, on the other sets only, and scored zero-shot on the set "
            "left out, next to the baselines of `scgene evaluate` on the same cells in the same run. These models are "
            "the recipe's, not this checkpoint; each ScGene row is named by its recipe. A column per set left out; "
            "each cell the mean ± sd over seeds and their number n.", "",
            *metric_tables(runs, {metric: name for metric, (_, name) in CARD_METRICS.items()})]


def _mean(scores: list[dict], metric: str) -> float:
    """The mean of a row's `metric` over its runs; NaN where not measured, so that no comparison with it holds."""
    values = finite_values(scores, metric)
    return float(np.mean(values)) if values else math.nan


def _transfer_limits(runs: list[dict]) -> list[str]:
    """One line per left-out set, recipe and baseline (50 PCs, the prior) whose mean over seeds beats the recipe's."""
    recipes = list(dict.fromkeys(scgene_row(run) for run in runs))
    lines = []
    for held_out, rows in scores_by_fold(runs).items():
        for recipe in recipes:
            ours = {metric: _mean(rows.get(recipe, []), metric) for metric in LIMIT_METRICS}
            for baseline in (PCA_ROW, PRIOR_ROW):
                theirs = {metric: _mean(rows.get(baseline, []), metric) for metric in LIMIT_METRICS}
                below = [f"{CARD_METRICS[metric][1]} {ours[metric]:.3f} < {theirs[metric]:.3f}"
                         for metric in LIMIT_METRICS if ours[metric] < theirs[metric]]
                if below:
                    lines.append(f"- {held_out} left out (leave-one-dataset-out, means over seeds): {recipe} below "
                                 f"{baseline} on " + "; ".join(below) + ".")
    return lines


def model_card(folder, evaluations: dict | None = None, repo_id: str | None = None,
               transfer: str | os.PathLike | None = None) -> ModelCard:
    """The card of the checkpoint in `folder`.

    `evaluations`: set name -> the `scores` of `scgene evaluate --json` on cells the model never saw (embedding row ->
    metric -> value); the zero-shot scores of the checkpoint's `build_record.json` are added. Every ScGene score
    becomes a `model-index` result; baselines are reported in the text beside it. `transfer`: the runs.jsonl of
    `scripts/leave_one_dataset_out.py`, whose tables become the "Leave-one-dataset-out transfer" section and whose
    losses to 50 PCs or the prior join the limits.
    """
    folder = checked_checkpoint(folder)
    runs = read_runs(transfer) if transfer is not None else []
    config = json.loads((folder / "config.json").read_text())
    record_path = folder / BUILD_RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    evaluations = {**record.get("zero_shot", {}), **(evaluations or {})}
    model_name = repo_id.split("/")[-1] if repo_id else folder.name
    where = repo_id or str(folder)
    results = [
        EvalResult(task_type="feature-extraction", task_name="cell embedding, zero-shot", dataset_type=dataset,
                   dataset_name=dataset, metric_type=CARD_METRICS[metric][0], metric_name=CARD_METRICS[metric][1],
                   metric_value=round(float(rows[SCGENE_ROW][metric]), 4))
        for dataset, rows in evaluations.items() if SCGENE_ROW in rows
        for metric in CARD_METRICS if _finite(rows[SCGENE_ROW].get(metric))
    ]
    data = ModelCardData(library_name="transformers", pipeline_tag="feature-extraction", license="apache-2.0",
                         tags=["scgene", "single-cell", "scRNA-seq", "biology", "custom_code"], model_name=model_name,
                         eval_results=results or None)
    trained, prior = _parameters(folder)
    architecture = (config.get("architectures") or ["ScGeneModel"])[0]
    lines = [
        f"# {model_name}", "",
        f"A ScGene single-cell model ({architecture}): {config['num_hidden_layers']} layers, d = "
        f"{config['hidden_size']}, {config['num_attention_heads']} heads, {config['encoder_type']} encoder with "
        f"{config['attention_type']} attention, {config['pooling']} pooling; {trained:,} trained parameters and a frozen "
        f"prior gene embedding of {config['vocab_size']:,} x {config['hidden_size']} ({prior:,} entries). Each gene of a "
        "cell is a token: the prior (co-expression gene2vec and gene knowledge, fused) plus an expression embedding.",
        "", "## Use", "",
        "```python", "import scanpy as sc", "from transformers import AutoFeatureExtractor, AutoModel", "",
        'adata = sc.read_h5ad("cells.h5ad")  # raw counts, human genes (symbols or Ensembl ids)',
        f'model = AutoModel.from_pretrained("{where}", trust_remote_code=True).eval()',
        f'tokenizer = AutoFeatureExtractor.from_pretrained("{where}", trust_remote_code=True)',
        'embeddings = model(**tokenizer(adata, return_tensors="pt")).pooler_output  # (cells, d)',
        "```", "",
        f"With scgene installed, `scgene.embed(adata, \"{where}\")` does the same in batches under a token budget and "
        "writes `adata.obsm[\"X_scgene\"]`.", "",
        "## Evaluation on cells it never saw", "",
        "`scgene evaluate` on labelled sets outside the training corpus. The baselines are computed on the same cells "
        "in the same run: 50 PCs of the set's own scaled log1p HVGs, logistic regression on its expression, the prior "
        "alone (expression-weighted mean of the prior rows) and the untrained model. PCA and logistic regression are "
        "fitted on the query itself; ScGene is not.", "",
    ]
    for dataset, rows in evaluations.items():
        lines += _score_table(dataset, rows)
    if not evaluations:
        lines += ["No evaluation was given: measure with `scgene evaluate --json` on cells the model never saw.", ""]
    lines += _label_transfer_section(record)
    if runs:
        lines += _transfer_section(runs)
    limits = _limits(evaluations) + _label_transfer_limits(record) + _transfer_limits(runs)
    lines += ["## Limits", "",
              *(limits or ["- None measured on the sets above; the sets are small (hundreds to thousands of cells)."]),
              _corpus_limit(record), ""]
    lines += _training_sections(folder, record)
    lines += ["## Intended use", "",
              "Cell embeddings for exploration (neighbours, UMAP, clustering) and as features for a classifier. Check "
              "the evaluation above against PCA on your own labelled cells before relying on it.", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    ModelCard(str(card))  # parses its own metadata back: a malformed model-index raises here, not on the Hub
    return card


def push(folder, repo_id: str, *, evaluations: dict | None = None, transfer: str | os.PathLike | None = None,
         private: bool = False, token: str | None = None, commit_message: str = "Upload ScGene checkpoint",
         api: HfApi | None = None):
    """Upload the checkpoint in `folder` to `repo_id` in one commit: `publishable_files` (weights, config, remote code,
    tokenizer with its vocabulary, records, the `cell-embedding` pipeline) and the card made by `model_card` (with
    `evaluations` and `transfer`) as README.md. The folder itself is not changed. Returns the commit info."""
    card = model_card(folder, evaluations=evaluations, repo_id=repo_id, transfer=transfer)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content if isinstance(content, bytes) else
                                     str(content)) for name, content in publishable_files(folder).items()]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card).encode()))
    api = api or HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.create_commit(repo_id, operations=operations, commit_message=commit_message)


def read_evaluations(specs: list[str]) -> dict:
    """`NAME=FILE.json` pairs (files written by `scgene evaluate --json`) -> set name -> scores."""
    evaluations = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator or not name or not path:
            raise ValueError(f"--evaluation takes NAME=FILE.json (the set's name, then scgene evaluate's JSON); got "
                             f"{spec!r}.")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--evaluation {spec}: no file {path}.")
        report = json.loads(Path(path).read_text())
        if "scores" not in report:
            raise ValueError(f"--evaluation {spec}: {path} has no 'scores'; write it with `scgene evaluate --json`.")
        evaluations[name] = report["scores"]
    return evaluations
