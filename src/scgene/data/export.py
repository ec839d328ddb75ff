"""Write tokenized cells as a Hugging Face `datasets` dataset, atomically.

The cells come from one AnnData or from a corpus of several (`{source name: AnnData or .h5ad path}`, files opened
backed one at a time), written into one dataset with one vocabulary and a `source` column. Cells are encoded chunk by chunk and streamed straight into `--num-shards` Arrow shards (the layout of
`save_to_disk`, so `load_from_disk` reads it) or Parquet shards, in a temporary folder next to the output;
the tokenizer is saved into the same folder. Only a complete result is renamed into place, so an
interrupted run leaves no half-written output (with `overwrite`, the previous output stays until then).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
from tqdm.auto import tqdm

from ..fileio import atomic_directory, claimed_output, write_output_marker
from ..tokenization_scgene import ScGeneTokenizer, opened

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


def corpus_obs_feature(column_name: str, columns: dict[str, pd.Series]) -> datasets.features.FeatureType:
    """One feature for an obs column over every source: a `ClassLabel` over the union of the sources' categories (in
    order of appearance), else the first source's type, which the others must share."""
    kinds = {source: describe(obs_feature(column)) for source, column in columns.items()}
    first_source = next(iter(columns))
    for source, kind in kinds.items():
        if kind != kinds[first_source]:
            raise ValueError(
                f"obs column {column_name!r} is {kinds[first_source]} in {first_source} but {kind} in {source}: give it "
                "one type in every input (e.g. adata.obs[col] = adata.obs[col].astype('category')), or leave it out."
            )
    first = obs_feature(columns[first_source])
    if isinstance(first, datasets.ClassLabel):
        categories = (str(c) for column in columns.values() for c in column.cat.categories)
        return datasets.ClassLabel(names=list(dict.fromkeys(categories)))
    return first


def describe(feature) -> str:
    return "categorical" if isinstance(feature, datasets.ClassLabel) else feature.dtype


def obs_array(column: pd.Series, feature) -> pa.Array:
    if isinstance(feature, datasets.ClassLabel):  # codes in the corpus-wide category list
        codes = pd.Categorical(column.astype(str), categories=feature.names).codes
        return pa.array(codes.astype(np.int64), type=pa.int64())
    if feature.dtype == "string":
        return pa.array(column.astype(str).to_numpy(), type=pa.string())
    return pa.array(column.to_numpy(), type=feature.pa_type)


def export_dataset(
    cells,
    output_dir: str | os.PathLike,
    tokenizer: ScGeneTokenizer,
    *,
    obs_columns: list[str] = (),
    num_shards: int = 1,
    file_format: str = "arrow",
    overwrite: bool = False,
    progress: bool = False,
    **encode_kwargs,
) -> Path:
    """Tokenize `cells` into `output_dir` (columns `input_ids`, `expression_values`, `expression_bins`,
    `total_counts` and `obs_columns`), with the tokenizer saved alongside. `encode_kwargs` go to `tokenizer.iter_encoded`.

    `cells` is an AnnData, or a corpus `{source name: AnnData or .h5ad path}`: its sources are written one after the
    other into the same shards, with a `source` column (a `ClassLabel` over the source names); each obs column must
    exist in every source, and categories are merged. Read back with `datasets.load_from_disk(output_dir)` (Arrow)
    or `load_dataset("parquet", data_files=f"{output_dir}/data-*.parquet")`; both also stream (`streaming=True`).
    """
    if file_format not in ("arrow", "parquet"):
        raise ValueError(f"file_format must be 'arrow' or 'parquet', got {file_format!r}")
    if not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    corpus = isinstance(cells, Mapping)
    sources = dict(cells) if corpus else {"cells": cells}
    input_paths = [source if isinstance(source, (str, os.PathLike)) else getattr(source, "filename", None)
                   for source in sources.values()]
    with claimed_output(output_dir, [path for path in input_paths if path], command="tokenize", folder=True,
                        overwrite=overwrite) as output_dir:
        _export(sources, corpus, output_dir, tokenizer, obs_columns, num_shards, file_format, progress, encode_kwargs)
    return output_dir


def _export(sources, corpus, output_dir, tokenizer, obs_columns, num_shards, file_format, progress, encode_kwargs):
    if not sources:
        raise ValueError("The corpus has no sources: pass at least one AnnData or .h5ad file.")
    reserved = set(TOKEN_FEATURES) | ({"source"} if corpus else set())
    if set(obs_columns) & reserved:
        raise ValueError(f"obs columns {sorted(set(obs_columns) & reserved)} clash with the columns written anyway "
                         f"{sorted(reserved)}; rename them or leave them out.")
    obs_tables, n_cells = {}, {}
    for name, source in sources.items():  # first pass: sizes and obs columns, so shards and labels span the corpus
        with opened(source) as adata:
            missing = [c for c in obs_columns if c not in adata.obs.columns]
            if missing:
                where = f" in {name}" if corpus else ""
                raise KeyError(f"obs columns not found{where}: {missing}; available: {list(adata.obs.columns)}")
            obs_tables[name], n_cells[name] = adata.obs[list(obs_columns)].copy(), adata.n_obs
    features = TOKEN_FEATURES | {c: corpus_obs_feature(c, {n: t[c] for n, t in obs_tables.items()}) for c in obs_columns}
    if corpus:
        features["source"] = datasets.ClassLabel(names=[str(name) for name in sources])
    features = datasets.Features(features)
    names = [f"data-{index:05d}-of-{num_shards:05d}.{file_format}" for index in range(num_shards)]
    total = sum(n_cells.values())
    with atomic_directory(output_dir) as staged:  # an older output_dir is replaced only once this one is complete
        with ShardWriter(staged, names, shard_sizes(total, num_shards), features.arrow_schema, file_format) as shards, \
                tqdm(total=total, unit="cells", desc="Tokenizing", disable=not (progress and corpus)) as bar:
            for index, (name, source) in enumerate(sources.items()):
                with opened(source) as adata:
                    for chunk in tokenizer.iter_encoded(adata, progress=progress and not corpus, **encode_kwargs):
                        obs = obs_tables[name].iloc[chunk.start : chunk.start + len(chunk.lengths)]
                        shards.write(chunk_record_batch(chunk, obs, features, source_index=index))
                        bar.update(len(chunk.lengths))
        if file_format == "arrow":
            write_dataset_state(staged, names, features)
        dataset_tokenizer(tokenizer, encode_kwargs).save_pretrained(staged)
        write_output_marker(staged, "tokenize")


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


def chunk_record_batch(chunk, obs: pd.DataFrame, features: datasets.Features, source_index: int = 0) -> pa.RecordBatch:
    """One `EncodedChunk` as an Arrow record batch of list columns (zero-copy over the flat arrays); the `source`
    column, when the features have one, holds `source_index`."""
    offsets = pa.array(np.concatenate([[0], np.cumsum(chunk.lengths)]).astype(np.int32))
    columns = {
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(chunk.input_ids.astype(np.int32, copy=False))),
        "expression_values": pa.ListArray.from_arrays(offsets, pa.array(chunk.expression_values)),
        "expression_bins": pa.ListArray.from_arrays(offsets, pa.array(chunk.expression_bins)),
        "total_counts": pa.array(chunk.total_counts.astype(np.float32, copy=False)),
    }
    if "source" in features:
        columns["source"] = pa.array(np.full(len(chunk.lengths), source_index, dtype=np.int64))
    for name in features:
        if name not in columns:
            columns[name] = obs_array(obs[name], features[name])
    return pa.RecordBatch.from_arrays([columns[name] for name in features], schema=features.arrow_schema)
