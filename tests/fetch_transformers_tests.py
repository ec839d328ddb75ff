"""Fetch transformers' common model tests for the installed transformers version (test setup; `make test` runs it).

`ModelTesterMixin` and `ConfigTester` live in `tests/` of transformers' source distribution, not in the wheel. This
downloads the sdist of exactly the installed version from the package index, takes `test_modeling_common.py` and
`test_configuration_common.py`, and lays them out as the package `transformers_common` beside scgene's stand-ins for
the three modules the sdist omits (`tests/transformers_common_shims`). The result goes to
`<venv>/transformers-tests/<version>/`, so the locked and the latest venv each test against their own version.
Nothing is fetched when that folder exists. Usage: `python tests/fetch_transformers_tests.py`.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

FILES = ("test_modeling_common.py", "test_configuration_common.py")
SHIMS = Path(__file__).parent / "transformers_common_shims"
PACKAGE = "transformers_common"


def tests_folder() -> Path:
    """Where the common tests of the installed transformers version are (or will be) laid out."""
    return Path(sys.prefix) / "transformers-tests" / importlib.metadata.version("transformers")


def fetch(folder: Path) -> None:
    version = folder.name
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"transformers=={version}", "-d", str(scratch)], check=True)
        (sdist,) = scratch.glob("transformers-*.tar.gz")
        folder.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{PACKAGE}-", dir=folder))  # beside the target: renamed in one step
        try:
            shutil.copytree(SHIMS, staging, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            with tarfile.open(sdist) as archive:
                for name in FILES:
                    member = archive.extractfile(f"transformers-{version}/tests/{name}")
                    (staging / name).write_bytes(member.read())
            staging.rename(folder / PACKAGE)  # complete or absent
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def main() -> None:
    folder = tests_folder()
    if (folder / PACKAGE / FILES[0]).is_file():
        return
    fetch(folder)
    print(f"transformers {folder.name} common tests in {folder / PACKAGE}")


if __name__ == "__main__":
    main()
