"""File helpers shared by the command-line tools: atomic writes, checksums, local folders told from Hub ids.

Every output is written to a temporary file (or directory) next to its target and renamed into place only when it is
complete, so a crash or an interrupt never leaves a half-written file and never destroys a finished older result.
Temporary entries carry their process id; the next write to the same target removes those of processes that are gone.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _default_mode(path: Path, mode: int) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the permissions a plain open()/mkdir() would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


TOKENIZER_FOLDER = "a saved tokenizer is a folder with preprocessor_config.json"
OUTPUT_MARKER = ".scgene-output.json"  # in every output folder a command writes: what may be replaced with overwrite


def local_or_hub(name, what: str) -> str:
    """`name` as from_pretrained takes it. A name that is clearly a path must be an existing folder, otherwise the
    Hub's repo-id error would hide a mistyped path: a PathLike, a name starting with /, . or ~, one with more than one
    "/" (a Hub id has at most one), or one whose first part is a local folder. `what` says what the folder holds."""
    text = os.path.expanduser(os.fspath(name))
    looks_like_path = (isinstance(name, os.PathLike) or str(name).startswith(("/", ".", "~")) or text.count("/") > 1
                       or ("/" in text and os.path.isdir(text.split("/")[0])))
    if looks_like_path and not os.path.isdir(text):
        raise FileNotFoundError(f"{name}: no such folder ({what}); check the path.")
    return text


def staging_prefix(target: Path) -> str:
    """Temporary entries next to `target` are named `.{name}.{pid}.…`: the process that owns them is known."""
    return f".{target.name}.{os.getpid()}."


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_staging(target: Path) -> None:
    """Remove what a killed run (kill -9, power loss) left next to `target`: staging entries whose process is gone.
    A killed replacement whose previous output sits moved aside (`.old`) with no `target` in place is put back."""
    if not target.parent.is_dir():
        return
    for entry in target.parent.glob(f".{glob.escape(target.name)}.*"):
        parts = entry.name[len(target.name) + 2 :].split(".")
        if len(parts) < 2 or not parts[0].isdigit() or entry.suffix not in (".tmp", ".old"):
            continue
        if process_alive(int(parts[0])):
            continue  # a run in progress
        previous = entry / target.name
        if entry.suffix == ".old" and previous.exists() and not target.exists():
            os.replace(previous, target)
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    fd, tmp_name = tempfile.mkstemp(prefix=staging_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        _default_mode(tmp, 0o666)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path`. An older `path` is moved aside,
    not deleted, until the new one is in place, and removed after."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    tmp = Path(tempfile.mkdtemp(prefix=staging_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _default_mode(tmp, 0o777)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=staging_prefix(target), suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks; recorded next to outputs so their sources can be checked."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@contextlib.contextmanager
def claimed_output(out: str | os.PathLike, inputs, *, command: str, folder: bool, overwrite: bool) -> Iterator[Path]:
    """The one rule every command follows before it writes `out` (checked before any work starts):

    - `out` is never an input, nor a folder that holds one, even with `overwrite`;
    - an existing `out` is replaced only with `overwrite`, and a folder only if it holds this command's
      `OUTPUT_MARKER` (what the command wrote itself; an empty folder is fine); a file is never replaced by a folder,
      nor a folder by a file;
    - one writer at a time: a lock next to `out` (`.NAME.lock`, with the writer's process id) makes a second
      concurrent run fail at once instead of both reporting success and one result being lost.
    The caller writes through `atomic_path` / `atomic_directory` and, for a folder, `write_output_marker`.
    """
    out = Path(out)
    target = out.resolve()
    for item in inputs:
        source = Path(item).resolve()
        if _is_within(source, target) or (source.is_dir() and target.exists() and _is_within(target, source)):
            what = ("is the input" if source == target else f"holds the input {item}" if _is_within(source, target)
                    else f"is a file of the input folder {item}")
            raise ValueError(f"The output {out} {what}; choose another output path (an input is never replaced, "
                             f"even with overwrite).")
    empty_folder = out.is_dir() and not any(out.iterdir())
    if (out.exists() or out.is_symlink()) and not (folder and empty_folder):
        if folder and not out.is_dir():
            raise FileExistsError(f"{out} is a file, and {command} writes a folder: choose a new folder name "
                                  f"(the file is left as it is).")
        if not folder and out.is_dir():
            raise FileExistsError(f"{out} is a folder, and {command} writes a file: choose a file name.")
        if not overwrite:
            raise FileExistsError(f"{out} exists; choose a new {'folder' if folder else 'file'} or pass "
                                  f"overwrite=True (--overwrite).")
        if folder and output_marker_command(out) != command:
            raise FileExistsError(
                f"{out} holds files that `scgene {command}` did not write (no {OUTPUT_MARKER} from it), so it is not "
                f"replaced, even with overwrite; choose a new folder, or remove it yourself if it is disposable."
            )
    with output_lock(out):
        yield out


def output_marker_command(folder: Path) -> str | None:
    """The command named by `folder`'s output marker, None without a readable one."""
    try:
        return json.loads((folder / OUTPUT_MARKER).read_text(encoding="utf-8")).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def write_output_marker(folder: str | os.PathLike, command: str) -> None:
    """Mark `folder` as written by `scgene COMMAND`, so that a later run of it may replace the folder."""
    (Path(folder) / OUTPUT_MARKER).write_text(json.dumps({"command": command}) + "\n", encoding="utf-8")


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold `.NAME.lock` next to `out` while writing it; a lock whose process is gone is taken over."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".{out.name}.lock"
    # the lock appears with the process id already in it (a hard link to a written file is atomic): a second writer
    # never reads a lock that exists but is still empty, which it would take for one left by a killed run
    staged = out.parent / f".{out.name}.lock.{os.getpid()}"
    staged.write_text(str(os.getpid()))
    try:
        for _ in range(2):
            try:
                os.link(staged, lock)
                break
            except FileExistsError:
                try:
                    owner = int(lock.read_text().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if owner == os.getpid():
                    raise ValueError(f"Two outputs of this run name {out}; give each output its own path.") from None
                if owner and process_alive(owner):
                    raise FileExistsError(f"Another process (pid {owner}) is writing {out}; wait for it to finish or "
                                          f"choose another output.") from None
                lock.unlink(missing_ok=True)  # left by a run that was killed
        else:
            raise FileExistsError(f"Could not lock {out} for writing ({lock} keeps reappearing); choose another "
                                  "output.")
    finally:
        staged.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
