"""Write a copy of an input `.h5ad` with new `obs` columns, `obsm` matrices and `uns` entries, atomically.

The input is copied byte for byte and only the new elements are written into the copy (anndata's `write_elem` on the
HDF5 file), so `X` is never loaded: a backed million-cell file costs a file copy, not its size in memory. The copy is
renamed onto the output only when complete; the input is never opened for writing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from ..fileio import atomic_path


@contextlib.contextmanager
def read_input(path: str | os.PathLike) -> Iterator:
    """Open an input `.h5ad` backed (read only), with one-line errors for a missing or unreadable file."""
    import anndata

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is not a file; pass the path of an .h5ad file.")
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path} could not be read as an .h5ad file ({error}); is it complete and an AnnData file?") from error
    try:
        yield adata
    finally:
        adata.file.close()


@contextlib.contextmanager
def annotated_copy(source: str | os.PathLike, out: str | os.PathLike) -> Iterator:
    """A byte copy of `source`, staged next to `out` and open for writing (an `h5py.File`); renamed onto `out` only
    when the block succeeds and the copy opens as an AnnData. The caller has claimed `out`
    (`fileio.claimed_output`): it is not the input and may be replaced."""
    import anndata
    import h5py

    with atomic_path(out) as staged:
        shutil.copyfile(source, staged)
        with h5py.File(staged, "a") as handle:
            yield handle
        anndata.read_h5ad(staged, backed="r").file.close()  # the copy opens as an AnnData before it is renamed


def write_elements(handle, *, obs: pd.DataFrame | None = None, obsm: dict | None = None, uns: dict | None = None) -> None:
    """Write `obs` columns (aligned to the file's cells), `obsm` arrays and `uns` entries into an open .h5ad,
    replacing same names."""
    from anndata.io import read_elem, write_elem

    if obs is not None:
        cells = read_elem(handle["obs"])
        if not cells.index.equals(obs.index):
            raise ValueError("The new obs columns do not line up with the input's cells.")
        cells = cells.assign(**{column: obs[column].values for column in obs.columns})
        del handle["obs"]
        write_elem(handle, "obs", cells)
    for group_name, elements in (("obsm", obsm or {}), ("uns", uns or {})):
        group = element_group(handle, group_name)
        for key, value in elements.items():
            if key in group:
                del group[key]
            write_elem(group, key, value)


def element_group(handle, name: str):
    """The `obsm` / `uns` group of an open .h5ad, created with anndata's encoding when missing."""
    group = handle.require_group(name)
    if "encoding-type" not in group.attrs:
        group.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
    return group


def write_annotated_copy(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    obs: pd.DataFrame | None = None,
    obsm: dict | None = None,
    uns: dict | None = None,
) -> Path:
    """`out` = `source` plus `obs` columns (aligned to its cells), `obsm` arrays and `uns` entries (replacing same names).
    The caller has claimed `out` (`fileio.claimed_output`): it is not the input and may be replaced."""
    with annotated_copy(source, out) as handle:
        write_elements(handle, obs=obs, obsm=obsm, uns=uns)
    return Path(out)
