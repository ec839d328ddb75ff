"""The GPU path: SDPA's flash and memory-efficient kernels, half precision and `torch.compile`, each checked against
float32 embeddings on the CPU. Every test runs on the CPU too where the kernel exists there (the flash kernel does, the
memory-efficient one does not); the CUDA cases need a GPU: `bench/gpu_check.sh` runs them on a GPU machine, and without
one they are skipped."""

from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import scgene
from scgene.inference import load_model

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="needs a CUDA device (bench/gpu_check.sh)"))
DEVICES = ["cpu", CUDA]

PBMC = Path(__file__).parent / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
EVEN_LENGTH = 64  # every PBMC 3k cell expresses more genes: each batch is unpadded, so the flash kernel may run


@pytest.fixture(scope="module")
def cells():
    return ad.read_h5ad(PBMC)[:300].copy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def embed_on(device: str, cells, **kwargs) -> np.ndarray:
    return scgene.embed(cells, load_model(None, device=device), key_added=None, progress=False, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_flash_kernel_embeddings_agree_with_float32(cells, device, dtype):
    """Unpadded batches (the mask is dropped) under the flash kernel alone; on CUDA, SDPA raises if it cannot use it
    (a mask would stop it; the CPU flash kernel takes masks, so there only the agreement is checked)."""
    reference = embed_on("cpu", cells, max_length=EVEN_LENGTH)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        flash = embed_on(device, cells, max_length=EVEN_LENGTH, dtype=dtype)
    assert cosines(flash, reference).min() >= 0.999


@pytest.mark.parametrize("device", [CUDA])
def test_padded_batches_run_on_the_memory_efficient_kernel(cells, device):
    """Cells of different lengths in one batch keep the padding mask: the memory-efficient kernel takes it."""
    reference = embed_on("cpu", cells)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        efficient = embed_on(device, cells, dtype="bfloat16", max_tokens_per_batch=8192)
    assert cosines(efficient, reference).min() >= 0.999


@pytest.mark.parametrize("device", [CUDA])  # on the CPU: test_embed_at_scale.py (float32, no graph breaks)
def test_compiled_bfloat16_embeddings_agree_with_float32(cells, device):
    reference = embed_on("cpu", cells)
    compiled = embed_on(device, cells, dtype="bfloat16", torch_compile=True)
    assert cosines(compiled, reference).min() >= 0.999


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_training_steps_lower_the_masked_loss(device):
    """A few AdamW steps of masked-expression pretraining under bf16 autocast on one batch: the loss goes down."""
    from scgene import ScGeneConfig, ScGeneForMaskedExpression, ScGeneTokenizer

    tokenizer = ScGeneTokenizer(max_length=EVEN_LENGTH)
    torch.manual_seed(0)
    config = ScGeneConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=256, n_bins=tokenizer.n_bins, expression_encoding="binned")
    model = ScGeneForMaskedExpression(config).to(device)
    batch = tokenizer(ad.read_h5ad(PBMC)[:64], return_tensors="pt")
    masked = torch.rand(batch["input_ids"].shape) < 0.15
    masked[:, 0] = False
    inputs = {key: value.to(device) for key, value in batch.items()} | {
        "labels": torch.where(masked, batch["expression_values"], -100.0).to(device),
        "expression_values": batch["expression_values"].masked_fill(masked, config.mask_value).to(device),
        "expression_bins": batch["expression_bins"].masked_fill(masked, config.n_bins).to(device),
    }
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
