"""Write tokenized cells as a Hugging Face `datasets` dataset, atomically.

Cells are encoded chunk by chunk and streamed into one Arrow file in a temporary folder next to the
output, which `datasets` then memory-maps and writes as `--num-shards` Arrow (`save_to_disk`) or Parquet
shards. The tokenizer is saved into the same folder. Only a complete result is renamed into place, so an
interrupted run leaves no half-written output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa

from ..tokenization_scgene import ScGeneTokenizer

TOKEN_FEATURES = {
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "expression_values": datasets.Sequence(datasets.Value("float32")),
    "expression_bins": datasets.Sequence(datasets.Value("int16")),
}


def obs_feature(column: pd.Series) -> datasets.features.FeatureType:
    """Categories become a `ClassLabel` (labels ready for classification), numbers keep their type."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        return datasets.ClassLabel(names=[str(c) for c in column.cat.categories])
    if pd.api.types.is_bool_dtype(column):
        return datasets.Value("bool")
    if pd.api.types.is_integer_dtype(column):
        return datasets.Value("int64")
    if pd.api.types.is_float_dtype(column):
        return datasets.Value("float32")
    return datasets.Value("string")


def obs_array(column: pd.Series, feature) -> pa.Array:
    if isinstance(feature, datasets.ClassLabel):
        return pa.array(column.cat.codes.to_numpy(), type=pa.int64())
    if feature.dtype == "string":
        return pa.array(column.astype(str).to_numpy(), type=pa.string())
    return pa.array(column.to_numpy(), type=feature.pa_type)


def export_dataset(
    adata,
    output_dir: str | os.PathLike,
    tokenizer: ScGeneTokenizer,
    *,
    obs_columns: list[str] = (),
    num_shards: int = 1,
    file_format: str = "arrow",
    overwrite: bool = False,
    **encode_kwargs,
) -> Path:
    """Tokenize `adata` into `output_dir` (columns `input_ids`, `expression_values`, `expression_bins` and
    `obs_columns`), with the tokenizer saved alongside. `encode_kwargs` go to `tokenizer.iter_encoded`.

    Read back with `datasets.load_from_disk(output_dir)` (Arrow) or `load_dataset("parquet",
    data_files=f"{output_dir}/data-*.parquet")`; either format also streams with `streaming=True`.
    """
    if file_format not in ("arrow", "parquet"):
        raise ValueError(f"file_format must be 'arrow' or 'parquet', got {file_format!r}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; choose a new folder or pass overwrite=True (--overwrite).")
    missing = [c for c in obs_columns if c not in adata.obs.columns]
    if missing:
        raise KeyError(f"obs columns not found: {missing}; available: {list(adata.obs.columns)}")
    features = datasets.Features(TOKEN_FEATURES | {c: obs_feature(adata.obs[c]) for c in obs_columns})
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    workspace = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        stream_path = workspace / "cells.arrow"
        with pa.OSFile(str(stream_path), "wb") as sink, pa.ipc.new_stream(sink, features.arrow_schema) as writer:
            for chunk in tokenizer.iter_encoded(adata, **encode_kwargs):
                writer.write_batch(chunk_record_batch(chunk, adata.obs.iloc[chunk.start : chunk.start + len(chunk.lengths)], features))
        dataset = datasets.Dataset.from_file(str(stream_path))
        staged = workspace / "dataset"
        if file_format == "arrow":
            dataset.save_to_disk(str(staged), num_shards=num_shards)
        else:
            staged.mkdir()
            for index in range(num_shards):
                shard = dataset.shard(num_shards, index, contiguous=True)
                shard.to_parquet(str(staged / f"data-{index:05d}-of-{num_shards:05d}.parquet"))
        del dataset
        tokenizer.save_pretrained(staged)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staged, output_dir)
    finally:
        shutil.rmtree(workspace, ignore_errors=True)
    return output_dir


def chunk_record_batch(chunk, obs: pd.DataFrame, features: datasets.Features) -> pa.RecordBatch:
    """One `EncodedChunk` as an Arrow record batch of list columns (zero-copy over the flat arrays)."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(chunk.lengths)]).astype(np.int32))
    columns = {
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(chunk.input_ids.astype(np.int32, copy=False))),
        "expression_values": pa.ListArray.from_arrays(offsets, pa.array(chunk.expression_values)),
        "expression_bins": pa.ListArray.from_arrays(offsets, pa.array(chunk.expression_bins)),
    }
    for name in features:
        if name not in columns:
            columns[name] = obs_array(obs[name], features[name])
    return pa.RecordBatch.from_arrays([columns[name] for name in features], schema=features.arrow_schema)
