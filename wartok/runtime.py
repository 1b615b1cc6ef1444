"""Device, precision and seeding: the few process-wide settings a run depends on."""
from __future__ import annotations

import contextlib
import os
import random
import signal

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


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """torch.compile when asked (inductor; on the CPU the first call compiles for ~15 s)."""
    return torch.compile(module) if enabled else module
