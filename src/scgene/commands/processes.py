"""`scgene embed` and `scgene annotate` under torchrun / accelerate launch: each process takes a contiguous share of
the cells (`sharding.shard_range` by rank), rank 0 claims the output before any work and is the only writer."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

from . import USER_ERRORS, user_error_message


def launched() -> bool:
    """Whether this process is one of several started by torchrun / accelerate launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group(options: dict, device_flag: str | None) -> Iterator[tuple[int, int, str]]:
    """Join the launcher's process group: NCCL with one GPU per process (`options["device"]` set to this rank's) or
    gloo on CPUs. Yields (rank, world size, device of the collectives); the group is destroyed on exit."""
    import torch
    import torch.distributed as dist

    on_gpu = torch.cuda.is_available() and not str(device_flag or "cuda").startswith("cpu")
    if on_gpu:
        options["device"] = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(options["device"])
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size(), options["device"] if on_gpu else "cpu"
    finally:
        dist.destroy_process_group()


def claimed_by_rank_zero(claims: contextlib.ExitStack, rank: int, device: str, claim: Callable[[], object],
                         command: str, flags: dict) -> bool:
    """Rank 0 enters `claim()` (the output's claim) on `claims` before anyone works; every rank learns whether that
    failed (the error is printed once). True: go on."""
    import torch
    import torch.distributed as dist

    failed = torch.zeros(1, device=device)
    if rank == 0:
        try:
            claims.enter_context(claim())
        except USER_ERRORS as error:
            print(user_error_message(command, error, flags), file=sys.stderr)
            failed += 1
    dist.broadcast(failed, 0)
    return not failed.item()
