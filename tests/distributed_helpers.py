"""Launch commands for the multi-process tests, each on a port that is free now: tests run side by side (pytest-xdist),
and two launchers on one fixed port make the second fail with EADDRINUSE."""

import socket


def free_port() -> int:
    """A TCP port no process listens on at this moment (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher(name: str) -> list[str]:
    """`python` arguments that start 2 local CPU processes: `torchrun` or `accelerate launch`."""
    if name == "torchrun":
        return ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    if name == "accelerate":  # `accelerate launch --cpu --num_processes 2` would start only one
        return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    raise ValueError(f"unknown launcher {name!r}")
