import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from scgene.fileio import atomic_directory, atomic_path, write_json

PBMC = Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"


def test_atomic_path_writes_with_normal_permissions_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "record.json"
    write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == '{\n  "a": 1\n}\n' and [p.name for p in target.parent.iterdir()] == ["record.json"]


def test_atomic_directory_replaces_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as folder:
        (folder / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as folder:
            (folder / "weights").write_text("half")
            raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "v1"
    with atomic_directory(target) as folder:
        (folder / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["model"]


def dead_pid() -> int:
    """The id of a process that has exited."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_what_a_killed_run_left_is_removed_by_the_next_write_and_a_moved_output_put_back(tmp_path):
    dead, alive = dead_pid(), os.getpid()
    stale_file = tmp_path / f".record.json.{dead}.abc.tmp"
    stale_file.write_text("half")
    (tmp_path / f".model.{dead}.def.tmp").mkdir()  # a killed run's staging folder
    running = tmp_path / f".model.{alive}.ghi.tmp"  # a run in progress: kept
    running.mkdir()
    moved = tmp_path / f".model.{dead}.jkl.old" / "model"  # killed between moving the old output aside and renaming
    moved.mkdir(parents=True)
    (moved / "weights").write_text("v1")
    write_json(tmp_path / "record.json", {"a": 1})
    assert not stale_file.exists()
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "model"):
            raise RuntimeError("interrupted")
    assert (tmp_path / "model" / "weights").read_text() == "v1"  # the previous output is back
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, "model", "record.json"])


def test_a_terminated_command_leaves_no_staging_folder(tmp_path):
    """SIGTERM during `scgene tokenize` (chunks slowed down): the command stops, and nothing is left."""
    slowed = textwrap.dedent(f"""
        import sys, time
        from scgene.tokenization_scgene import ScGeneTokenizer
        original = ScGeneTokenizer.iter_encoded
        def slow(self, adata, **kwargs):
            for chunk in original(self, adata, **kwargs):
                print("chunk", flush=True)
                time.sleep(0.5)
                yield chunk
        ScGeneTokenizer.iter_encoded = slow
        from scgene.cli import main
        sys.exit(main(["tokenize", {str(PBMC)!r}, {str(tmp_path / "out")!r}, "--chunk-size", "64"]))
    """)
    process = subprocess.Popen([sys.executable, "-c", slowed], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    while process.stdout.readline().strip() != "chunk":  # until staging has begun
        assert process.poll() is None
    assert any(p.name.startswith(".out.") for p in tmp_path.iterdir())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the output rule every command follows
def snapshot(folder: Path) -> dict:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture()
def cells_h5ad(tmp_path):
    import anndata

    path = tmp_path / "project" / "data" / "cells.h5ad"
    path.parent.mkdir(parents=True)
    anndata.read_h5ad(PBMC)[:20].write_h5ad(path)
    return path


@pytest.mark.parametrize("output", ["other_file", "the_input", "the_project"])
def test_tokenize_never_removes_an_input_or_a_folder_it_did_not_write(tmp_path, cells_h5ad, output, capsys):
    """The three cases of bb31448: OUT an unrelated existing file, OUT the input itself, OUT a folder that holds the
    input; each refused even with --overwrite, with every file left as it was."""
    from scgene.cli import main

    other = tmp_path / "B.h5ad"
    other.write_bytes(cells_h5ad.read_bytes())
    out = {"other_file": other, "the_input": cells_h5ad, "the_project": tmp_path / "project"}[output]
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert main(["tokenize", str(cells_h5ad), str(out), *extra]) == 1
        err = capsys.readouterr().err
        assert "choose" in err and "--overwrite" not in err  # never advised where it would destroy
        assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_a_folder_the_same_command_wrote(tmp_path, cells_h5ad, capsys):
    from scgene.cli import main

    out = tmp_path / "tokens"
    assert main(["tokenize", str(cells_h5ad), str(out)]) == 0
    assert main(["tokenize", str(cells_h5ad), str(out), "--overwrite"]) == 0  # its own output: replaced
    user_folder = tmp_path / "notes"
    user_folder.mkdir()
    (user_folder / "mine.txt").write_text("keep")
    assert main(["tokenize", str(cells_h5ad), str(user_folder), "--overwrite"]) == 1
    assert "did not write" in capsys.readouterr().err and (user_folder / "mine.txt").read_text() == "keep"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["tokenize", str(cells_h5ad), str(empty)]) == 0  # an empty folder holds nothing to lose


def test_claimed_output_refuses_inputs_files_of_input_folders_and_concurrent_writers(tmp_path):
    from scgene.fileio import claimed_output

    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_text("weights")
    with pytest.raises(ValueError, match="is a file of the input folder"):
        with claimed_output(model / "model.safetensors", [model], command="embed", folder=False, overwrite=True):
            pass
    out = tmp_path / "out.h5ad"
    with claimed_output(out, [model], command="embed", folder=False, overwrite=False):
        lock = tmp_path / ".out.h5ad.lock"
        assert lock.read_text() == str(os.getpid())
        # a second writer in another process fails at once instead of both reporting success
        script = textwrap.dedent(f"""
            from scgene.fileio import claimed_output
            try:
                with claimed_output({str(out)!r}, [], command="embed", folder=False, overwrite=True):
                    raise SystemExit(3)
            except FileExistsError as error:
                print(error)
        """)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
        assert result.returncode == 0 and f"(pid {os.getpid()}) is writing" in result.stdout, result
    assert not lock.exists()
    lock.write_text("999999999")  # left by a killed run: taken over
    with claimed_output(out, [], command="embed", folder=False, overwrite=False):
        pass


def test_embed_checks_its_output_before_the_work(tmp_path, cells_h5ad, capsys):
    """An --out that is the input's folder or a file inside the model folder is refused before any model loads."""
    from scgene.cli import main

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # not a loadable model: the output error must come first
    before = snapshot(tmp_path)
    for out in (model / "config.json", cells_h5ad.parent):
        assert main(["embed", str(cells_h5ad), "--model", str(model), "--out", str(out), "--overwrite"]) == 1
        assert "choose" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_two_real_embeds_to_one_output_cannot_both_report_success(tmp_path, cells_h5ad):
    """Two `scgene embed --overwrite` processes on one --out, the second started while the first holds the output:
    exactly one writes it and says so; the other stops with a one-line error and writes nothing. (Before the output
    was claimed at the start, both wrote and both said "Wrote": one result was silently lost.) The first is paused
    (SIGSTOP) as soon as its lock appears and resumed once the second has finished, so the two always overlap; started
    together and left alone, a loaded machine sometimes ran them one after the other, and then both rightly wrote."""
    out = tmp_path / "out.h5ad"
    lock = tmp_path / f".{out.name}.lock"
    command = [sys.executable, "-m", "scgene.cli", "embed", str(cells_h5ad), "--out", str(out), "--overwrite"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert lock.exists(), first.communicate()
    first.send_signal(signal.SIGSTOP)
    try:
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    results = [(first.wait(timeout=300), *first.communicate()), (second.returncode, second.stdout, second.stderr)]
    assert [code for code, _, _ in results] == [0, 1], results
    assert sum(f"Wrote {out}" in stdout for _, stdout, _ in results) == 1
    failed = results[1][2]
    assert "scgene embed: error:" in failed and "is writing" in failed, failed
    assert "Traceback" not in failed
    import anndata

    assert anndata.read_h5ad(out).obsm["X_scgene"].shape[0] == anndata.read_h5ad(cells_h5ad).n_obs
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.h5ad", "project"]  # no staging or lock left
    assert [path.name for path in cells_h5ad.parent.iterdir()] == [cells_h5ad.name]
