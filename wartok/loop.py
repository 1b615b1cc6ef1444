"""The optimisation loop every training stage shares: steps, clipping, schedule, logging,
checkpoints and exact resume, non-finite steps, and stopping at a step boundary on a signal.

Data-parallel (wartok/dist.py): gradients are averaged over ranks after backward, in this loop
rather than by wrapping models in DistributedDataParallel, because a stage's step function
calls several modules and their methods (the tokenizer, its quantizer's similarity, the joint
baseline's AR in extra_groups), which DDP's forward hooks would not see; one all-reduce over
everything the optimizer trains covers them all. Only rank 0 logs and saves."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm

from wartok import dist
from wartok.checkpoint import CheckpointConfig, CheckpointError, StageCheckpointer, rng_state, set_rng_state
from wartok.config import StageConfig
from wartok.optim import build_optimizer, warmup_cosine
from wartok.results import ScalarLog

# step_fn(step) -> (loss to minimise, raw scalars to log); scalars stay tensors so that no
# host-device sync happens in a step: only at log lines, checkpoints and the stage's end.
StepFn = Callable[[int], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]
AfterStepFn = Callable[[int], "dict[str, torch.Tensor]"]
# Set by wartok.run's SIGUSR2 / SIGTERM handlers; the loop saves and stops at the next step boundary.
STOP = threading.Event()


class NonFiniteLoss(RuntimeError):
    """A stage produced a NaN or inf loss or gradient; the run stops as failed, nothing non-finite is saved."""


class Interrupted(RuntimeError):
    """The run was asked to stop (preemption, time limit); its stage saved a checkpoint first."""


@dataclass
class StageContext:
    """What every stage needs from the run, and nothing of the global config."""

    device: torch.device
    precision: str
    log: ScalarLog
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    checkpoint_dir: Optional[Path] = None   # None: this stage is not checkpointed (e.g. a cached stage)
    config: dict[str, Any] = field(default_factory=dict)  # the flattened run config, for checkpoint hashes


@dataclass
class StageSummary:
    steps: int
    last: dict[str, float]  # the averages over the last logging interval
    nonfinite_skipped: int = 0


class Averages:
    """Per-key sums of logged scalars since the last log line, on the device. A key that some
    steps do not report (a signal computed every n-th step) is averaged over the steps that
    reported it; a skipped non-finite step (keep=False) adds nothing."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, scalars: dict[str, torch.Tensor], keep: torch.Tensor) -> None:
        weight = keep.float()
        for key, value in scalars.items():
            value = torch.where(keep, value.detach().float(), 0.0)  # NaN * 0 would still be NaN
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0.0) + weight

    def pop(self) -> dict[str, float]:
        """The averages since the last pop, and over ranks (each rank averaged its own slices);
        keys that only skipped steps reported are left out."""
        counts = {key: float(count) for key, count in self.counts.items()}
        means = dist.all_reduce_mean({key: value / max(counts[key], 1.0) for key, value in self.sums.items()})
        self.sums, self.counts = {}, {}
        return {key: value.item() for key, value in means.items() if counts[key] > 0}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # on the device, as the steps' scalars are (checkpoints load on the CPU)
        self.sums, self.counts = ({key: value.to(self.device) for key, value in state[part].items()}
                                  for part in ("sums", "counts"))


class NonFiniteSteps:
    """Flags a step whose loss or gradient norm is not finite, on the device, so that the step
    needs no host sync: the fused optimizer skips the flagged update itself (its found_inf), and
    the count is read, and checkpoint.on_nonfinite / max_nonfinite enforced, only where the loop
    syncs anyway (log lines, checkpoints, the stage's end), always before anything is saved. The
    AR upkeep (a tracker refresh) of a skipped step still runs; only the tokenizer's update is
    skipped."""

    def __init__(self, name: str, cfg: CheckpointConfig, device: torch.device):
        self.name, self.cfg, self.device = name, cfg, device
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_loss = torch.zeros((), device=device)

    def flag(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
        """() bool: True where this step is non-finite."""
        bad = ~torch.isfinite(loss.float() + grad_norm.float())
        first = bad & (self.first_step < 0)
        self.first_step = torch.where(first, step, self.first_step)
        self.first_loss = torch.where(first, loss.detach().float(), self.first_loss)
        self.count = self.count + bad
        return bad

    def check(self) -> int:
        """The number skipped so far; raises NonFiniteLoss where the config does not allow them."""
        count = int(self.count)
        if count == 0 or (self.cfg.on_nonfinite == "skip" and count <= self.cfg.max_nonfinite):
            return count
        reason = ("checkpoint.on_nonfinite=fail" if self.cfg.on_nonfinite == "fail"
                  else f"{count} non-finite steps, more than checkpoint.max_nonfinite={self.cfg.max_nonfinite}")
        raise NonFiniteLoss(f"stage {self.name}: non-finite loss or gradient at step {int(self.first_step)} "
                            f"(loss {float(self.first_loss)}; {reason})")

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "first_step": self.first_step, "first_loss": self.first_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.first_step, self.first_loss = (state[key].to(self.device)  # checkpoints load on the CPU
                                                        for key in ("count", "first_step", "first_loss"))


def run_stage(
    name: str,
    params: Iterable[torch.nn.Parameter],
    stage: StageConfig,
    step_fn: StepFn,
    ctx: StageContext,
    extra_groups: Sequence[tuple[Iterable[torch.nn.Parameter], float]] = (),
    after_step: Optional[AfterStepFn] = None,
    stateful: Optional[dict[str, Any]] = None,
) -> StageSummary:
    """Run `stage.steps` optimizer steps of `step_fn`, logging averages every log_every steps.

    extra_groups: (params, lr) trained by the same loss at their own lr (the joint baseline's AR).
    after_step(step) runs after the optimizer step (auxiliary-model upkeep) and returns scalars.
    stateful: name -> object with state_dict/load_state_dict (models, the data stream, the
    prior term) that a checkpoint must hold for the resumed stage to equal an uninterrupted one.
    """
    params = [p for p in params if p.requires_grad]
    extra_groups = [([p for p in group if p.requires_grad], lr) for group, lr in extra_groups]
    clipped = params + [p for group, _ in extra_groups for p in group]
    optimizer = build_optimizer(params, stage.optim, extra_groups)
    schedule = warmup_cosine(optimizer, stage.optim, stage.steps)
    averages, nonfinite, last = Averages(ctx.device), NonFiniteSteps(name, ctx.checkpoint, ctx.device), {}
    objects = {**(stateful or {}), "optimizer": optimizer, "schedule": schedule, "averages": averages,
               "nonfinite": nonfinite}
    saver = None if ctx.checkpoint_dir is None else StageCheckpointer(
        ctx.checkpoint_dir / f"stage_{name}", name, ctx.config, ctx.checkpoint.keep)
    start = 0 if saver is None else resume(saver, objects, ctx)
    distributed = dist.world_size() > 1
    if distributed:
        dist.broadcast_(clipped)  # every rank starts from rank 0's weights, whatever its init did
        if start == 0:
            dist.seed_per_rank()  # (a resumed stage restored each rank's own RNG state)
    max_norm = stage.optim.grad_clip if stage.optim.grad_clip > 0 else float("inf")
    for step in tqdm(range(start, stage.steps), desc=f"stage {name}", disable=None if dist.is_main() else True,
                     leave=False):
        loss, scalars = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        checked, stop = loss.detach(), None  # stop: None reads STOP at the step's end (one process)
        if distributed:  # the mean gradient; every rank sees the mean loss and any rank's stop request
            checked, stop = dist.average_gradients(clipped, checked, STOP.is_set())
        grad_norm = torch.nn.utils.clip_grad_norm_(clipped, max_norm)  # inf: measures, scales by exactly 1
        bad = nonfinite.flag(step, checked, grad_norm)
        optimizer.found_inf = bad.float()  # the fused step leaves a flagged step's weights and moments as they were
        optimizer.step()
        schedule.step()  # also on a skipped step: the schedule stays a function of the step index
        scalars["grad_norm"] = grad_norm
        if after_step is not None:
            scalars.update(after_step(step))
        averages.add(scalars, keep=~bad)
        last_step, stop = step == stage.steps - 1, STOP.is_set() if stop is None else stop
        log_due = (step + 1) % stage.log_every == 0 or last_step
        save_due = saver is not None and ((ctx.checkpoint.every and (step + 1) % ctx.checkpoint.every == 0)
                                          or last_step or stop)
        skipped = nonfinite.check() if log_due or save_due else None  # the one sync, before any write
        if log_due:
            last = averages.pop()
            ctx.log.log(name, step + 1, {**last, "lr": schedule.get_last_lr()[0], "nonfinite_skipped": skipped})
        if save_due:
            save(saver, step + 1, objects, ctx)
        if stop and not last_step:
            raise Interrupted(f"stage {name} stopped at step {step + 1} of {stage.steps} (checkpoint saved)")
    optimizer.zero_grad(set_to_none=True)  # a trained model leaves its stage without stale .grad
    return StageSummary(steps=stage.steps, last=last, nonfinite_skipped=nonfinite.check())


def save(saver: StageCheckpointer, step: int, objects: dict[str, Any], ctx: StageContext) -> None:
    """Rank 0 writes; with several ranks it also stores what differs between them (every rank
    calls this): their RNG states and their not-yet-logged sums, for an exact resume."""
    ranks = None
    if dist.world_size() > 1:
        averages = objects["averages"].state_dict()
        mine = {"rng": rng_state(), "averages": {part: {k: v.cpu() for k, v in averages[part].items()}
                                                 for part in ("sums", "counts")}}
        ranks = dist.all_gather_objects(mine)
    if not dist.is_main():
        return
    state = {name: obj.state_dict() for name, obj in objects.items() if obj is not None}
    saver.save(step, {"objects": state, "log_offset": ctx.log.offset(), **({"ranks": ranks} if ranks else {})})


def resume(saver: StageCheckpointer, objects: dict[str, Any], ctx: StageContext) -> int:
    """Restore the stage from its latest checkpoint (or checkpoint.resume); returns the next step."""
    explicit = ctx.checkpoint.resume
    state = saver.load_latest(Path(explicit) if explicit and _stage_of(explicit) == saver.stage else None)
    if state is None:
        return 0
    missing = [name for name, obj in objects.items() if obj is not None and name not in state["objects"]]
    if missing:
        raise CheckpointError(f"stage {saver.stage}: its checkpoint at step {state['step']} holds no {missing} "
                              "(written by an older wartok); resume it with that version or start the stage anew")
    for name, obj in objects.items():
        if obj is not None:
            obj.load_state_dict(state["objects"][name])
    set_rng_state(state["rng"])
    ranks = state.get("ranks") or []
    if dist.world_size() > 1 and len(ranks) == dist.world_size():
        set_rng_state(ranks[dist.rank()]["rng"])
        objects["averages"].load_state_dict(ranks[dist.rank()]["averages"])
    elif dist.world_size() > 1 or ranks:  # the data position counts global batches: resumable all the same
        dist.warn_main(f"stage {saver.stage}: resuming with {dist.world_size()} processes from a checkpoint of "
                       f"{max(len(ranks), 1)}; random draws and the next logged averages differ from an "
                       "uninterrupted run")
        dist.seed_per_rank()
    return int(state["step"])


def _stage_of(path: str) -> Optional[str]:
    parent = Path(path).parent.name
    return parent[len("stage_"):] if parent.startswith("stage_") else None
