"""The optimisation loop every training stage shares: steps, clipping, schedule, logging."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from tqdm.auto import tqdm

from wartok.config import StageConfig
from wartok.optim import build_optimizer, warmup_cosine
from wartok.results import ScalarLog

# step_fn(step) -> (loss to minimise, raw scalars to log); scalars stay tensors so that
# no host-device sync happens except at log intervals.
StepFn = Callable[[int], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
AfterStepFn = Callable[[int], "dict[str, torch.Tensor]"]


class NonFiniteLoss(RuntimeError):
    """A stage produced a NaN or inf loss; the run stops as failed and nothing non-finite is saved."""


@dataclass
class StageSummary:
    steps: int
    last: dict[str, float]  # the averages over the last logging interval


def forever(loader: Iterable) -> Iterator:
    """Cycle a DataLoader epoch after epoch (its seeded generator keeps the order reproducible)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the data loader is empty: lower the batch size or enlarge the subset")


def run_stage(
    name: str,
    params: Iterable[torch.nn.Parameter],
    stage: StageConfig,
    step_fn: StepFn,
    log: ScalarLog,
    device: torch.device,
    extra_groups: Sequence[tuple[Iterable[torch.nn.Parameter], float]] = (),
    after_step: Optional[AfterStepFn] = None,
) -> StageSummary:
    """Run `stage.steps` optimizer steps of `step_fn`, logging averaged scalars every log_every steps.

    extra_groups: (params, lr) trained by the same loss at their own lr (the joint baseline's AR).
    after_step(step) runs after the optimizer step (auxiliary-model upkeep) and returns scalars.
    A scalar that some steps do not report (a signal computed every n-th step) is averaged over
    the steps that reported it.
    """
    params = [p for p in params if p.requires_grad]
    extra_groups = [([p for p in group if p.requires_grad], lr) for group, lr in extra_groups]
    clipped = params + [p for group, _ in extra_groups for p in group]
    optimizer = build_optimizer(params, stage.optim, device, extra_groups)
    schedule = warmup_cosine(optimizer, stage.optim, stage.steps)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    last: dict[str, float] = {}
    for step in tqdm(range(stage.steps), desc=f"stage {name}", disable=None, leave=False):
        loss, scalars = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if stage.optim.grad_clip > 0:
            scalars["grad_norm"] = torch.nn.utils.clip_grad_norm_(clipped, stage.optim.grad_clip)
        optimizer.step()
        schedule.step()
        if after_step is not None:
            scalars.update(after_step(step))
        for key, value in scalars.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float()
            counts[key] = counts.get(key, 0) + 1
        if (step + 1) % stage.log_every == 0 or step == stage.steps - 1:
            last = {key: (value / counts[key]).item() for key, value in sums.items()}
            if not math.isfinite(last.get("loss", 0.0)):
                raise NonFiniteLoss(f"stage {name}: non-finite loss {last['loss']} by step {step}")
            log.log(name, step + 1, {**last, "lr": schedule.get_last_lr()[0]})
            sums, counts = {}, {}
    optimizer.zero_grad(set_to_none=True)  # a trained model leaves its stage without stale .grad
    return StageSummary(steps=stage.steps, last=last)
