import os
import signal
import stat
import subprocess
import sys
import textwrap
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
