"""Device, precision and seeding: the few process-wide settings a run depends on."""
from __future__ import annotations

import contextlib
import os
import random
import signal
from typing import Callable

import numpy as np
import torch

from wartok.validate import ConfigError


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; asking for CUDA without one is a configuration error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda is not allowed on this machine (no CUDA device); choose one of: auto, cpu")
    return torch.device(name)


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls on GPUs (bf16-level accuracy is all the models need). On CPUs, flush
    denormals to zero: early in training the conv tokenizer's activations and gradients hit
    denormal floats and a step ran 4x slower on this project's CPU (measured in stage A)."""
    torch.set_flush_denormal(True)
    threads_from_scheduler()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where asked for; fp32 runs under a no-op context. Works on CPU and CUDA."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: a worker ignores SIGUSR2 and SIGTERM. SLURM and submitit signal
    every process of a job; the main process must finish its step and checkpoint, which it
    cannot do if its workers died of the same signal first."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def maybe_compile(module: torch.nn.Module, enabled: bool, backend: str | Callable = "inductor") -> torch.nn.Module:
    """Compile the module's forward in place when asked, and return the module.

    In place (`nn.Module.compile`), so the state dict keeps its keys and a checkpoint written by
    a compiled run loads into an eager one. A frame the backend fails on (no C++ toolchain, an
    op inductor cannot lower) falls back to eager for that frame, with dynamo's warning in the
    log, instead of ending a run that would train correctly, only slower. The first compiled
    call of a shape takes seconds to a minute (~15 s for the smoke models on a 2-core CPU).
    """
    if not enabled:
        return module
    import torch._dynamo  # noqa: F401  (imported here: it costs ~1 s and most runs never compile)

    torch._dynamo.config.suppress_errors = True  # a failed compile means eager, not a crash
    module.compile(backend=backend)
    return module


def threads_from_scheduler() -> None:
    """Under SLURM, use the CPUs the job was given, not every core of the node: without
    cgroups torch sees all cores, and jobs sharing a node would oversubscribe it.
    An explicit OMP_NUM_THREADS wins."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ and cpus.isdigit() and int(cpus) > 0:
        torch.set_num_threads(int(cpus))
