"""Trains a tiny ScGeneForMaskedExpression for 3 AdamW steps on fixed 8-cell batches, sharded with torch's FSDP2
(`fully_shard`, one unit per ScGene layer, then the whole model) when run under torchrun with several processes
(each process takes its slice of every batch), or whole in one process; then saves the full weights to
$FSDP_WEIGHTS (rank 0). Used by tests/test_training.py to check that ScGene trains sharded on CPU."""

import gc
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, str(Path(__file__).parent))
from modeling_helpers import random_cells, tiny_config, with_prior  # noqa: E402
from scgene import ScGeneForMaskedExpression  # noqa: E402
from scgene.modeling_scgene import ScGeneLayer  # noqa: E402


def masked_batch(step: int, mask_value: float, n_bins: int) -> dict:
    cells = random_cells(8, 12, seed=step)
    masked = torch.zeros_like(cells["expression_values"], dtype=torch.bool)
    masked[:, 2 + step : 6 + step] = True
    cells["labels"] = torch.where(masked, cells["expression_values"], -100.0)
    cells["bin_labels"] = torch.where(masked, cells["expression_bins"], -100)
    cells["expression_values"] = cells["expression_values"].masked_fill(masked, mask_value)
    cells["expression_bins"] = cells["expression_bins"].masked_fill(masked, n_bins)
    return cells


sharded = "WORLD_SIZE" in os.environ
if sharded:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
torch.manual_seed(0)
model = with_prior(ScGeneForMaskedExpression(tiny_config(expression_encoding="binned")))
if sharded:
    mesh = init_device_mesh("cpu", (world,))
    for module in model.modules():
        if isinstance(module, ScGeneLayer):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
for step in range(3):
    batch = masked_batch(step, model.config.mask_value, model.config.n_bins)
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss = model(**{name: tensor[rows] for name, tensor in batch.items()}).loss  # a mean over this process's cells
    loss.backward()  # FSDP averages the gradients over processes: the mean over all 8 cells
    optimizer.step()
    optimizer.zero_grad()
weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) if sharded else model.state_dict()
if rank == 0:
    save_file({name: tensor.contiguous() for name, tensor in weights.items()}, os.environ["FSDP_WEIGHTS"])
if sharded:
    # FSDP2 keeps gloo work objects that hold tensors; freed at interpreter exit, after the process group, they can
    # abort the process ("terminate called without an active exception", pytorch/pytorch#179291). Free them while the
    # group lives, let every rank finish (rank 0's file written), then leave without the interpreter's teardown.
    del model, optimizer, weights, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
