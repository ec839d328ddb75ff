"""Embedding at scale: `scgene embed --shard I/N` and `scgene merge` (equal to one run, resumable, refusing gaps),
embedding under torchrun, and half-precision inference."""

from pathlib import Path

import anndata as ad
import numpy as np
import pytest

from scgene.cli import main
from scgene.sharding import parse_shard, shard_range

PBMC = Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharding") / "cells.h5ad"
    ad.read_h5ad(PBMC)[:37].copy().write_h5ad(path)
    return path


def test_shards_cover_every_cell_once_in_order():
    for n_obs, count in ((37, 3), (10, 10), (1000, 7)):
        ranges = [shard_range(f"{index}/{count}", n_obs) for index in range(count)]
        assert [row for part in ranges for row in part] == list(range(n_obs))
    for bad in ("3/3", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ValueError, match="--shard takes I/N"):
            parse_shard(bad)
    with pytest.raises(ValueError, match="use at most 5 shards"):
        shard_range("0/6", 5)


def test_sharded_embedding_equals_one_run_and_resumes(source, tmp_path, capsys):
    whole = tmp_path / "whole.h5ad"
    assert main(["embed", str(source), "--out", str(whole)]) == 0
    shards = tmp_path / "shards"
    for index in (2, 0):  # any order, as array jobs finish
        assert main(["embed", str(source), "--shard", f"{index}/3", "--out", str(shards)]) == 0
    merged = tmp_path / "merged.h5ad"
    assert main(["merge", str(shards), "--input", str(source), "--out", str(merged)]) == 1
    assert "1 of 3 shards are missing" in capsys.readouterr().err and not merged.exists()
    assert main(["embed", str(source), "--shard", "1/3", "--out", str(shards), "--max-tokens-per-batch", "700"]) == 0
    finished = (shards / "shard-0-of-3.npz").read_bytes()
    assert main(["embed", str(source), "--shard", "0/3", "--out", str(shards)]) == 0  # a restarted array job
    assert "skipped" in capsys.readouterr().out and (shards / "shard-0-of-3.npz").read_bytes() == finished
    assert main(["merge", str(shards), "--input", str(source), "--out", str(merged)]) == 0
    one, joined = ad.read_h5ad(whole), ad.read_h5ad(merged)
    assert list(joined.obs_names) == list(one.obs_names)
    np.testing.assert_allclose(joined.obsm["X_scgene"], one.obsm["X_scgene"], atol=1e-6)
    assert joined.uns["X_scgene"]["shards"] == 3


def test_merge_refuses_shards_of_another_file(source, tmp_path, capsys):
    other = tmp_path / "other.h5ad"
    ad.read_h5ad(PBMC)[37:74].copy().write_h5ad(other)
    shards = tmp_path / "shards"
    assert main(["embed", str(other), "--shard", "0/1", "--out", str(shards)]) == 0
    assert main(["merge", str(shards), "--input", str(source), "--out", str(tmp_path / "m.h5ad")]) == 1
    assert "another file" in capsys.readouterr().err
    assert main(["embed", str(source), "--shard", "0/2", "--out", str(shards), "--plot", "x.png"]) == 1
    assert "--plot needs every cell" in capsys.readouterr().err


def test_embed_under_torchrun_equals_one_process(source, tmp_path):
    """2 CPU processes (gloo): each embeds its share, rank 0 writes the cells in input order, as one process would."""
    import subprocess
    import sys

    from distributed_helpers import launcher

    whole, parallel = tmp_path / "whole.h5ad", tmp_path / "parallel.h5ad"
    assert main(["embed", str(source), "--out", str(whole)]) == 0
    command = [sys.executable, *launcher("torchrun"), "-m", "scgene.cli", "embed", str(source), "--out", str(parallel),
               "--device", "cpu"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Wrote") == 1  # one writer
    one, joined = ad.read_h5ad(whole), ad.read_h5ad(parallel)
    assert list(joined.obs_names) == list(one.obs_names)
    np.testing.assert_allclose(joined.obsm["X_scgene"], one.obsm["X_scgene"], atol=1e-6)
    assert joined.uns["X_scgene"]["processes"] == 2


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_embeddings_agree_with_float32(source, dtype):
    """Autocast keeps the weights, the prior and the norms in float32: cosine >= 0.999 per cell with the shipped
    checkpoint, and with its prior read-out switched off (the encoder's own states, where rounding shows most)."""
    import scgene
    from scgene.inference import load_model

    cells = ad.read_h5ad(source)
    for readout in (None, 0.0):
        model = load_model(None)
        if readout is not None:
            model.config.prior_readout_weight = readout
        reference = scgene.embed(cells, model, key_added=None, progress=False)
        reduced = scgene.embed(cells, model, key_added=None, progress=False, dtype=dtype)
        cosine = (reduced * reference).sum(1) / np.linalg.norm(reduced, axis=1) / np.linalg.norm(reference, axis=1)
        assert cosine.min() >= 0.999, (readout, cosine.min())
        assert not np.array_equal(reduced, reference)  # the precision did change the arithmetic
    with pytest.raises(ValueError, match="dtype must be one of"):
        scgene.embed(cells, key_added=None, progress=False, dtype="int8")


def test_embeddings_stream_into_an_array_on_disk(source, tmp_path):
    """`out=` (here a numpy memmap; the CLI passes the output file's HDF5 dataset) receives every batch in place: the
    same numbers as in memory, and obsm is left alone."""
    import scgene

    cells = ad.read_h5ad(source)
    in_memory = scgene.embed(cells, key_added=None, progress=False)
    on_disk = np.lib.format.open_memmap(tmp_path / "embeddings.npy", mode="w+", dtype=np.float32,
                                        shape=in_memory.shape)
    scgene.embed(cells, out=on_disk, max_tokens_per_batch=500, progress=False)
    on_disk.flush()
    np.testing.assert_allclose(np.load(tmp_path / "embeddings.npy"), in_memory, atol=1e-6)
    assert "X_scgene" not in cells.obsm and "X_scgene" in cells.uns
    with pytest.raises(ValueError, match="out has shape"):
        scgene.embed(cells, out=np.zeros((3, 3), np.float32), progress=False)
    written = tmp_path / "embedded.h5ad"
    assert main(["embed", str(source), "--out", str(written)]) == 0
    np.testing.assert_allclose(ad.read_h5ad(written).obsm["X_scgene"], in_memory, atol=1e-6)


def test_rows_in_any_order_reach_an_hdf5_dataset_in_order(tmp_path):
    """`InOrderWriter` writes contiguous slabs as soon as every earlier row has come, whatever the arrival order."""
    import h5py

    from scgene.inference import InOrderWriter

    rng = np.random.default_rng(0)
    values = rng.normal(size=(5000, 8)).astype(np.float32)
    with h5py.File(tmp_path / "rows.h5", "w") as handle:
        dataset = handle.create_dataset("x", shape=values.shape, dtype="float32", chunks=(256, 8))
        writer = InOrderWriter(dataset)
        for window in np.array_split(np.arange(5000), 7):  # windows in order, rows shuffled within each
            for rows in np.array_split(rng.permutation(window), 13):
                writer[rows] = values[rows]
        assert writer.written == 5000
        np.testing.assert_array_equal(dataset[:], values)


def test_compiled_forward_gives_the_eager_embeddings_in_one_graph(source, tmp_path):
    """`--torch-compile`: the same embeddings as eager on padded and unpadded batches of several shapes, compiled
    without graph breaks (a break would silently run part of the model eagerly)."""
    import torch._dynamo

    eager, compiled = tmp_path / "eager.h5ad", tmp_path / "compiled.h5ad"
    budget = ["--max-tokens-per-batch", "3000"]  # 37 cells of up to 256 tokens: several batch shapes
    assert main(["embed", str(source), "--out", str(eager), *budget]) == 0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    assert main(["embed", str(source), "--out", str(compiled), "--torch-compile", *budget]) == 0
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it did compile
    written = ad.read_h5ad(compiled)
    np.testing.assert_allclose(written.obsm["X_scgene"], ad.read_h5ad(eager).obsm["X_scgene"], atol=1e-5)
    assert written.uns["X_scgene"]["torch_compile"]


def test_prefetched_batches_come_in_order_raise_the_producers_error_and_stop_with_the_consumer():
    import threading
    import time

    from scgene.inference import prefetched

    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("a bad cell")

    items = prefetched(failing())
    assert next(items) == 1
    with pytest.raises(ValueError, match="a bad cell"):
        next(items)

    produced = []

    def endless():
        for index in range(10**9):
            produced.append(index)
            yield index

    for item in prefetched(endless(), depth=2):
        if item == 3:
            break  # the consumer stops: the producer must stop too, not run on in the background
    time.sleep(0.3)
    stopped_at = len(produced)
    time.sleep(0.3)
    assert len(produced) == stopped_at <= 3 + 2 + 2
    assert not any(thread.name == "scgene-prefetch" for thread in threading.enumerate())


def test_annotate_under_torchrun_equals_one_process(source, tmp_path):
    """2 CPU processes label their shares against the same reference; rank 0 writes what one process writes."""
    import subprocess
    import sys

    from distributed_helpers import launcher

    reference = tmp_path / "reference.h5ad"
    ad.read_h5ad(PBMC)[100:400].copy().write_h5ad(reference)
    transfer = ["--reference", str(reference), "--label-key", "cell_type"]
    whole, parallel = tmp_path / "whole.h5ad", tmp_path / "parallel.h5ad"
    assert main(["annotate", str(source), "--out", str(whole), *transfer]) == 0
    command = [sys.executable, *launcher("torchrun"), "-m", "scgene.cli", "annotate", str(source), "--out",
               str(parallel), "--device", "cpu", *transfer]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("Wrote") == 1  # one writer
    one, joined = ad.read_h5ad(whole), ad.read_h5ad(parallel)
    assert list(joined.obs_names) == list(one.obs_names)
    assert list(joined.obs["scgene_label"]) == list(one.obs["scgene_label"])
    for column in ("scgene_label_confidence", "scgene_label_distance"):
        np.testing.assert_allclose(joined.obs[column], one.obs[column], atol=1e-6)
    assert joined.uns["scgene_label"]["processes"] == 2
