"""Embedding a file in shards, for schedulers without torchrun (Slurm arrays, workflow scatters).

`scgene embed IN --shard I/N --out FOLDER` embeds the I-th of N contiguous runs of cells into
`FOLDER/shard-I-of-N.npz` (cell names, embeddings, the run's record); `scgene merge FOLDER --input IN --out OUT`
checks that every shard is there and that their cells are the input's, in order, and writes the input plus the
embedding. A cell's embedding does not depend on the other cells of its batch, so the merged result is the one a
single run gives.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

SHARD_FILE = re.compile(r"shard-(\d+)-of-(\d+)\.npz")


def parse_shard(value: str) -> tuple[int, int]:
    """'I/N' -> (I, N), with 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value or "")
    if not match or not int(match[1]) < int(match[2]):
        raise ValueError(f"--shard takes I/N with 0 <= I < N (e.g. 0/8 ... 7/8, as $SLURM_ARRAY_TASK_ID/8), got "
                         f"{value!r}.")
    return int(match[1]), int(match[2])


def shard_path(folder, value: str) -> Path:
    index, count = parse_shard(value)
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"--out {folder} is a file; with --shard it is the folder the shards are written to.")
    return folder / f"shard-{index}-of-{count}.npz"


def shard_range(value: str, n_obs: int) -> range:
    """The rows of shard I of N: N contiguous runs of (almost) equal size."""
    index, count = parse_shard(value)
    if count > n_obs:
        raise ValueError(f"--shard {value}: {count} shards for {n_obs} cells; use at most {n_obs} shards.")
    bounds = np.linspace(0, n_obs, count + 1).round().astype(int)
    return range(int(bounds[index]), int(bounds[index + 1]))


def read_shards(folder) -> tuple[np.ndarray, np.ndarray, dict]:
    """(cell names, embeddings, record) of every shard in `folder`, in shard order; an error names missing shards."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of shards (written by `scgene embed --shard I/N --out "
                                f"{folder}`).")
    found = {}
    for path in folder.iterdir():
        match = SHARD_FILE.fullmatch(path.name)
        if match:
            found.setdefault(int(match[2]), {})[int(match[1])] = path
    if not found:
        raise FileNotFoundError(f"{folder} holds no shard-I-of-N.npz files: run `scgene embed IN --shard I/N --out "
                                f"{folder}` first.")
    if len(found) > 1:
        raise ValueError(f"{folder} holds shards of runs cut in {sorted(found)} parts: keep one run's shards there.")
    count, paths = next(iter(found.items()))
    missing = sorted(set(range(count)) - set(paths))
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {count} shards are missing in {folder} (e.g. "
                                f"{[f'{i}/{count}' for i in missing[:5]]}): run `scgene embed IN --shard "
                                f"{missing[0]}/{count} --out {folder}` for each, then merge again.")
    names, embeddings, records = [], [], []
    for index in range(count):
        with np.load(paths[index], allow_pickle=False) as shard:
            names.append(shard["names"])
            embeddings.append(shard["embeddings"])
            records.append(json.loads(str(shard["record"])))
    record = records[0] | {"shards": count, "cells": None}
    return np.concatenate(names), np.concatenate(embeddings), {k: v for k, v in record.items() if v is not None}
