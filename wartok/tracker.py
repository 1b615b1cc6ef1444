"""The two AR models of the WGF signal and their upkeep: tracker q_phi and target p_theta.

The tracker follows the tokenizer's current token distribution: every `refresh_every`
tokenizer steps it takes `refresh_steps` AdamW steps of next-token cross-entropy on detached
hard tokens, drawn from the current batch or from a replay buffer of recent batches. The
target is the prior the tokens should suit: `frozen` (stage B's prior), `online` (keeps
fitting the current tokens by maximum likelihood, own lr and cadence) or `ema` (an
exponential moving average of the tracker, updated after each refresh).

Neither model ever receives a gradient from the tokenizer's loss: their logits are computed
under inference mode (wgf.teacher_forced_logits), and their own optimizers only see their own
cross-entropy on detached tokens. All randomness here (replay draws) comes from a private
generator, so switching the signal's weight to zero leaves the run's other random streams,
and hence its numbers, untouched.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch

from wartok.models.gpt import GPT, GPTConfig, PRESETS as GPT_PRESETS, gpt_config
from wartok.optim import fused_adamw
from wartok.runtime import autocast
from wartok.validate import ConfigError, check_choice, check_finite, check_int, check_unit_interval

TRACKER_INITS = ("target", "scratch")
TRACKER_SOURCES = ("batch", "replay")
TARGET_MODES = ("frozen", "online", "ema")


@dataclass
class TrackerConfig:
    """q_phi. The defaults are the stable setting of METHOD.md's CPU experiment: slow, and
    initialised from the target so that delta starts at exactly zero."""

    arch: Optional[str] = None     # None: the target's architecture; else a GPT preset (tiny|small|base)
    vocab_size: Optional[int] = None  # None: the codebook size; a preset for another vocabulary is refused
    init: str = "target"           # target | scratch
    refresh_every: int = 1         # tokenizer steps between refreshes (the "AR-tracker refresh rate")
    refresh_steps: int = 1         # optimizer steps per refresh
    lr: float = 3.0e-5
    weight_decay: float = 0.0
    source: str = "replay"         # batch (the current batch) | replay (random recent batches)
    replay_size: int = 8           # batches kept in the replay buffer
    seed_offset: int = 17          # the private generator's seed is the stage seed + this

    def __post_init__(self) -> None:
        if self.arch is not None:
            check_choice("tvc.prior.tracker.arch", self.arch, GPT_PRESETS)
        if self.vocab_size is not None:
            check_int("tvc.prior.tracker.vocab_size", self.vocab_size, 2)
        check_choice("tvc.prior.tracker.init", self.init, TRACKER_INITS)
        check_int("tvc.prior.tracker.refresh_every", self.refresh_every, 1)
        check_int("tvc.prior.tracker.refresh_steps", self.refresh_steps, 1)
        check_finite("tvc.prior.tracker.lr", self.lr, minimum=0.0, strict=True)
        check_finite("tvc.prior.tracker.weight_decay", self.weight_decay, minimum=0.0)
        check_choice("tvc.prior.tracker.source", self.source, TRACKER_SOURCES)
        check_int("tvc.prior.tracker.replay_size", self.replay_size, 1)
        check_int("tvc.prior.tracker.seed_offset", self.seed_offset, 0)


@dataclass
class TargetConfig:
    """p_theta: frozen (default, stage B's prior), online MLE, or an EMA of the tracker."""

    mode: str = "frozen"           # frozen | online | ema
    lr: float = 1.0e-5             # online: AdamW lr
    every: int = 1                 # online: tokenizer steps between target updates
    ema_decay: float = 0.99        # ema: target <- decay * target + (1 - decay) * tracker

    def __post_init__(self) -> None:
        check_choice("tvc.prior.target.mode", self.mode, TARGET_MODES)
        check_finite("tvc.prior.target.lr", self.lr, minimum=0.0, strict=True)
        check_int("tvc.prior.target.every", self.every, 1)
        check_unit_interval("tvc.prior.target.ema_decay", self.ema_decay, open_right=True)


def tracker_gpt_config(cfg: TrackerConfig, target: GPTConfig) -> GPTConfig:
    """The tracker's GPTConfig; raises ConfigError when it cannot share the target's token space."""
    if cfg.vocab_size is not None and cfg.vocab_size != target.vocab_size:
        raise ConfigError(f"tvc.prior.tracker.vocab_size={cfg.vocab_size} is not allowed; it must equal "
                          f"the codebook size {target.vocab_size}")
    if cfg.arch is None:
        return copy.deepcopy(target)
    if cfg.init == "target":
        raise ConfigError(f"tvc.prior.tracker.arch={cfg.arch} is not allowed with tvc.prior.tracker.init=target; "
                          "init=target copies the target's weights, so arch must be null (or use init=scratch)")
    return gpt_config(cfg.arch, target.vocab_size, target.block_size, target.num_classes)


class ReplayBuffer:
    """The last `size` batches of hard tokens (and labels), on the device, detached."""

    def __init__(self, size: int):
        self.size = size
        self.tokens: list[torch.Tensor] = []
        self.labels: list[Optional[torch.Tensor]] = []

    def push(self, tokens: torch.Tensor, labels: Optional[torch.Tensor]) -> None:
        self.tokens.append(tokens.detach().clone())
        self.labels.append(None if labels is None else labels.detach().clone())
        if len(self.tokens) > self.size:
            self.tokens.pop(0), self.labels.pop(0)

    def draw(self, generator: torch.Generator) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        i = int(torch.randint(len(self.tokens), (1,), generator=generator))
        return self.tokens[i], self.labels[i]

    def state_dict(self) -> dict[str, Any]:
        return {"tokens": list(self.tokens), "labels": list(self.labels)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens, self.labels = list(state["tokens"]), list(state["labels"])


def _adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    return fused_adamw(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)


def _mle_step(model: GPT, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
              labels: Optional[torch.Tensor], precision: str) -> torch.Tensor:
    """One next-token cross-entropy step on detached tokens (B, T); returns the loss before the step.
    The forward runs under the run's precision (bf16 autocast on a bf16 run), the backward outside it."""
    model.train()
    cond = labels if model.config.num_classes > 0 else None
    with autocast(tokens.device, precision):
        _, loss = model(tokens, cond=cond, targets=tokens)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # no stale .grad survives outside the refresh
    return loss.detach()


class TrackerTarget:
    """Owns q_phi and p_theta, their optimizers, the replay buffer and the refresh schedule."""

    def __init__(self, target: GPT, tracker_cfg: TrackerConfig, target_cfg: TargetConfig, seed: int,
                 precision: str = "fp32"):
        self.tracker_cfg, self.target_cfg, self.precision = tracker_cfg, target_cfg, precision
        device = next(target.parameters()).device
        self.target = target.requires_grad_(target_cfg.mode == "online")
        tracker_config = tracker_gpt_config(tracker_cfg, target.config)
        if tracker_cfg.init == "target":
            self.tracker = copy.deepcopy(target).requires_grad_(True)
        else:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed + tracker_cfg.seed_offset)  # scratch init must not shift the run's RNG
                self.tracker = GPT(tracker_config).to(device)
        self.tracker_opt = _adamw(self.tracker, tracker_cfg.lr, tracker_cfg.weight_decay)
        self.target_opt = _adamw(self.target, target_cfg.lr, 0.0) if target_cfg.mode == "online" else None
        self.replay = ReplayBuffer(tracker_cfg.replay_size)
        self.generator = torch.Generator().manual_seed(seed + tracker_cfg.seed_offset)

    def after_step(self, step: int, tokens: torch.Tensor, labels: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Upkeep after tokenizer step `step` (0-based) on its detached hard tokens (B, T)."""
        scalars: dict[str, torch.Tensor] = {}
        self.replay.push(tokens, labels)
        if (step + 1) % self.tracker_cfg.refresh_every == 0:
            for _ in range(self.tracker_cfg.refresh_steps):
                batch, batch_labels = ((tokens, labels) if self.tracker_cfg.source == "batch"
                                       else self.replay.draw(self.generator))
                scalars["tracker_refresh_ce"] = _mle_step(self.tracker, self.tracker_opt, batch, batch_labels,
                                                          self.precision)
            if self.target_cfg.mode == "ema":
                self._ema_update()
        if self.target_opt is not None and (step + 1) % self.target_cfg.every == 0:
            scalars["target_update_ce"] = _mle_step(self.target, self.target_opt, tokens, labels, self.precision)
        return scalars

    @torch.no_grad()
    def _ema_update(self) -> None:
        decay = self.target_cfg.ema_decay
        for p_target, p_tracker in zip(self.target.parameters(), self.tracker.parameters()):
            p_target.lerp_(p_tracker, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "target": self.target.state_dict(),
                "tracker_opt": self.tracker_opt.state_dict(),
                "target_opt": None if self.target_opt is None else self.target_opt.state_dict(),
                "replay": self.replay.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.target.load_state_dict(state["target"])
        self.tracker_opt.load_state_dict(state["tracker_opt"])
        if self.target_opt is not None:
            self.target_opt.load_state_dict(state["target_opt"])
        self.replay.load_state_dict(state["replay"])
        self.generator.set_state(state["generator"])
