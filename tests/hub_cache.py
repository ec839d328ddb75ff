"""A Hugging Face cache laid out the way a Hub download leaves it, for loading `org/name` offline in tests."""

import hashlib
from pathlib import Path

import huggingface_hub

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def populate_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """Each file's content in blobs/ under its hash (sha256 for LFS files such as the weights, the git blob sha1 for
    the others), linked from snapshots/<commit>/ by a relative symlink, and refs/main naming the commit; checked with
    huggingface_hub's own reading of the layout."""
    repo_cache = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot, blobs = repo_cache / "snapshots" / COMMIT, repo_cache / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name, content in files.items():
        if name.endswith(".safetensors"):
            blob = hashlib.sha256(content).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        (blobs / blob).write_bytes(content)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob))
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(COMMIT)
    scanned = huggingface_hub.scan_cache_dir(cache)
    assert repo_id in {repo.repo_id for repo in scanned.repos} and not scanned.warnings
