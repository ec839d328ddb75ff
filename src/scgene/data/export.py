"""Write tokenized cells as a Hugging Face `datasets` dataset, atomically.

Cells are encoded chunk by chunk and streamed straight into `--num-shards` Arrow shards (the layout of
`save_to_disk`, so `load_from_disk` reads it) or Parquet shards, in a temporary folder next to the output;
the tokenizer is saved into the same folder. Only a complete result is renamed into place, so an
interrupted run leaves no half-written output (with `overwrite`, the previous output stays until then).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

from ..fileio import atomic_directory
from ..tokenization_scgene import ScGeneTokenizer

TOKEN_FEATURES = {
    "input_ids": datasets.Sequence(datasets.Value("int32")),
    "expression_values": datasets.Sequence(datasets.Value("float32")),
    "expression_bins": datasets.Sequence(datasets.Value("int16")),
    "total_counts": datasets.Value("float32"),  # the cell's raw count total (NaN for log1p input): count views
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
    """Tokenize `adata` into `output_dir` (columns `input_ids`, `expression_values`, `expression_bins`,
    `total_counts` and `obs_columns`), with the tokenizer saved alongside. `encode_kwargs` go to `tokenizer.iter_encoded`.

    Read back with `datasets.load_from_disk(output_dir)` (Arrow) or `load_dataset("parquet",
    data_files=f"{output_dir}/data-*.parquet")`; either format also streams with `streaming=True`.
    """
    if file_format not in ("arrow", "parquet"):
        raise ValueError(f"file_format must be 'arrow' or 'parquet', got {file_format!r}")
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"{output_dir} exists; choose a new folder or pass overwrite=True (--overwrite).")
    missing = [c for c in obs_columns if c not in adata.obs.columns]
    if set(obs_columns) & set(TOKEN_FEATURES):
        raise ValueError(f"obs columns {sorted(set(obs_columns) & set(TOKEN_FEATURES))} clash with the token columns "
                         f"{list(TOKEN_FEATURES)} (total_counts is always written); rename them or leave them out.")
    if missing:
        raise KeyError(f"obs columns not found: {missing}; available: {list(adata.obs.columns)}")
    features = datasets.Features(TOKEN_FEATURES | {c: obs_feature(adata.obs[c]) for c in obs_columns})
    names = [f"data-{index:05d}-of-{num_shards:05d}.{file_format}" for index in range(num_shards)]
    with atomic_directory(output_dir) as staged:  # an older output_dir is replaced only once this one is complete
        with ShardWriter(staged, names, shard_sizes(adata.n_obs, num_shards), features.arrow_schema, file_format) as shards:
            for chunk in tokenizer.iter_encoded(adata, **encode_kwargs):
                obs = adata.obs.iloc[chunk.start : chunk.start + len(chunk.lengths)]
                shards.write(chunk_record_batch(chunk, obs, features))
        if file_format == "arrow":
            write_dataset_state(staged, names, features)
        dataset_tokenizer(tokenizer, encode_kwargs).save_pretrained(staged)
    return output_dir


def dataset_tokenizer(tokenizer: ScGeneTokenizer, encode_kwargs: dict) -> ScGeneTokenizer:
    """The tokenizer with the settings these cells were encoded with, so a model trained on them (the training
    scripts save this tokenizer into every checkpoint) is used at inference with the same gene selection and length.
    A sampling seed is kept as a record only: inference never samples."""
    settings = {key: encode_kwargs[key] for key in ("gene_selection", "top_k", "gene_column") if encode_kwargs.get(key)}
    if not encode_kwargs.get("truncation", True):
        settings["max_length"] = None
    elif encode_kwargs.get("max_length") is not None:
        settings["max_length"] = encode_kwargs["max_length"]
    settings["sampling_seed"] = encode_kwargs.get("seed")
    return tokenizer.with_settings(**settings)


def shard_sizes(n_rows: int, num_shards: int) -> list[int]:
    """Contiguous shard sizes, as `Dataset.shard(contiguous=True)` splits rows."""
    return [n_rows // num_shards + (index < n_rows % num_shards) for index in range(num_shards)]


class ShardWriter:
    """Streams record batches into consecutive shard files (Arrow IPC streams, as `save_to_disk` writes, or
    Parquet), splitting batches at shard boundaries; nothing is read back, so memory stays one chunk."""

    def __init__(self, folder: Path, names: list[str], sizes: list[int], schema: pa.Schema, file_format: str):
        self.folder, self.names, self.sizes, self.schema, self.file_format = folder, names, sizes, schema, file_format
        self.index, self.room, self.writer, self.sink = -1, 0, None, None

    def _next_shard(self) -> None:
        self.close()
        self.index += 1
        path = str(self.folder / self.names[self.index])
        if self.file_format == "parquet":
            self.writer = pq.ParquetWriter(path, self.schema)
        else:
            self.sink = pa.OSFile(path, "wb")
            self.writer = pa.ipc.new_stream(self.sink, self.schema)
        self.room = self.sizes[self.index]

    def write(self, batch: pa.RecordBatch) -> None:
        while batch.num_rows:
            if self.room == 0:
                self._next_shard()
            part = batch.slice(0, self.room)
            self.writer.write_batch(part)
            self.room -= part.num_rows
            batch = batch.slice(part.num_rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.sink is not None:
            self.sink.close()
        self.writer, self.sink = None, None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        while exc_info[0] is None and self.index < len(self.names) - 1:  # empty trailing shards still get a file
            self._next_shard()
        self.close()


def write_dataset_state(folder: Path, names: list[str], features: datasets.Features) -> None:
    """`state.json` and `dataset_info.json` for `load_from_disk`: written by `save_to_disk` for an empty
    dataset with the same features, then pointed at our shards (the files are exactly what it expects)."""
    empty = datasets.Dataset.from_dict({name: [] for name in features}, features=features)
    template = folder / ".template"
    bars_were_disabled = are_progress_bars_disabled()
    disable_progress_bars()  # the empty template's "Saving the dataset" bar would only confuse
    try:
        empty.save_to_disk(str(template))
    finally:
        if not bars_were_disabled:
            enable_progress_bars()
    state = json.loads((template / "state.json").read_text())
    state["_data_files"] = [{"filename": name} for name in names]
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    shutil.copy(template / "dataset_info.json", folder / "dataset_info.json")
    shutil.rmtree(template)


def chunk_record_batch(chunk, obs: pd.DataFrame, features: datasets.Features) -> pa.RecordBatch:
    """One `EncodedChunk` as an Arrow record batch of list columns (zero-copy over the flat arrays)."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(chunk.lengths)]).astype(np.int32))
    columns = {
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(chunk.input_ids.astype(np.int32, copy=False))),
        "expression_values": pa.ListArray.from_arrays(offsets, pa.array(chunk.expression_values)),
        "expression_bins": pa.ListArray.from_arrays(offsets, pa.array(chunk.expression_bins)),
        "total_counts": pa.array(chunk.total_counts.astype(np.float32, copy=False)),
    }
    for name in features:
        if name not in columns:
            columns[name] = obs_array(obs[name], features[name])
    return pa.RecordBatch.from_arrays([columns[name] for name in features], schema=features.arrow_schema)
