"""AdamW with linear warm-up and cosine decay: the optimizer every stage uses."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from wartok.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig, device: torch.device,
                    extra_groups: Sequence[tuple[Iterable[torch.nn.Parameter], float]] = ()) -> torch.optim.AdamW:
    """AdamW over `params` at cfg.lr, plus `extra_groups` of (params, lr) (the joint baseline's AR
    prior trains at its own lr in the same step); the schedule scales every group alike."""
    groups = []
    for group_params, lr in [(params, cfg.lr), *extra_groups]:
        group_params = [p for p in group_params if p.requires_grad]
        # As in GPT-2/nanoGPT: decay weight matrices and embeddings, never biases or norm gains.
        groups += [{"params": [p for p in group_params if p.dim() >= 2], "weight_decay": cfg.weight_decay, "lr": lr},
                   {"params": [p for p in group_params if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]
    groups = [g for g in groups if g["params"]]
    # The fused kernel is the fast path on CUDA; the default (foreach) path is the right one on CPU.
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused)


def warmup_cosine(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr factor: linear 0 -> 1 over warm-up, then cosine 1 -> min_lr_ratio at total_steps."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total_steps - warmup, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
