"""The training stages of METHOD.md: tokenizer (A, and C for two-stage) and priors (B, D)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from wartok.config import StageConfig
from wartok.loop import StageSummary, forever, run_stage
from wartok.results import ScalarLog
from wartok.runtime import autocast
from wartok.tvc import TVCConfig, likelihood_terms, posterior_terms, weigh


@dataclass
class StageContext:
    """What every stage needs from the run, and nothing of the global config."""

    device: torch.device
    precision: str
    log: ScalarLog


def train_tokenizer(name: str, tokenizer: torch.nn.Module, loader: DataLoader, stage: StageConfig,
                    tvc: TVCConfig, ctx: StageContext) -> StageSummary:
    """Likelihood + posterior training (stage A; stage C of the two-stage baseline)."""
    batches = forever(loader)
    tokenizer.train()

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, _ = next(batches)
        images = images.to(ctx.device, non_blocking=True)  # (B, C, H, W)
        with autocast(ctx.device, ctx.precision):
            out = tokenizer(images)
        terms = {**likelihood_terms(images, out.recon), **posterior_terms(out.quant)}
        loss = weigh(terms, tvc)
        return loss, {**terms, "loss": loss, "usage": out.quant.usage, "perplexity": out.quant.perplexity}

    return run_stage(name, tokenizer.parameters(), stage, step_fn, ctx.log, ctx.device)


def train_prior(name: str, prior: torch.nn.Module, loader: DataLoader, stage: StageConfig,
                ctx: StageContext) -> StageSummary:
    """Next-token maximum likelihood on frozen token sequences (stages B and D)."""
    batches = forever(loader)
    conditional = prior.config.num_classes > 0
    prior.train()

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, labels = next(batches)
        tokens = tokens.to(ctx.device, non_blocking=True)  # (B, T)
        cond = labels.to(ctx.device) if conditional else None
        with autocast(ctx.device, ctx.precision):
            _, loss = prior(tokens, cond=cond, targets=tokens)
        return loss, {"loss": loss}

    return run_stage(name, prior.parameters(), stage, step_fn, ctx.log, ctx.device)
