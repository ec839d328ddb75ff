import os
import stat

import pytest

from scgene.fileio import atomic_directory, atomic_path, write_json


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
