"""AdamW with linear warm-up and cosine decay: the optimizer every stage uses."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

if TYPE_CHECKING:  # wartok.config imports the tracker, which builds its optimizer here
    from wartok.config import OptimConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig,
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
    return fused_adamw(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def fused_adamw(params: Iterable, **kwargs) -> torch.optim.AdamW:
    """torch's fused AdamW, on every device: one kernel per step on CUDA, and on the CPU 3.4x
    faster than the per-tensor loop (1.0 vs 3.3 ms per step for conv_small, measured on the
    2-core development machine). It is also the one AdamW whose step takes a device-side
    `found_inf` flag and skips a non-finite update without a host sync (wartok/loop.py relies
    on that)."""
    return torch.optim.AdamW(params, fused=True, **kwargs)


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
