"""The training stages of METHOD.md: tokenizer (A, and C for two-stage) and priors (B, D)."""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from wartok import dist
from wartok.config import StageConfig
from wartok.loop import AfterStepFn, StageContext, StageSummary, StepFn, run_stage
from wartok.runtime import autocast
from wartok.stream import BatchStream
from wartok.tvc import TVCConfig, likelihood_terms, posterior_terms, weigh


def tokenizer_step_fn(tokenizer: torch.nn.Module, batches: Iterator, tvc: TVCConfig, ctx: StageContext,
                      prior_term: Optional[Any] = None) -> StepFn:
    """step(step) -> (loss, raw scalars) of one tokenizer batch: likelihood + posterior terms, plus
    the prior term of joint or wartok (`prior_term`, see wartok/method.py), weighed by tvc.weigh."""

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, labels = next(batches)
        images = images.to(ctx.device, non_blocking=True)  # (B, C, H, W)
        labels = torch.as_tensor(labels).to(ctx.device, non_blocking=True)  # (B,)
        with autocast(ctx.device, ctx.precision):
            out = tokenizer(images)
            terms = {**likelihood_terms(images, out.recon), **posterior_terms(out.quant)}
            if prior_term is not None:
                terms.update(prior_term.terms(tokenizer, out, labels, step))
        prior_weight = tvc.prior.weight_at(step)
        loss = weigh(terms, tvc, prior_weight)
        scalars = {**terms, "loss": loss, "usage": out.quant.usage, "perplexity": out.quant.perplexity}
        if prior_term is not None:
            scalars["prior_weight"] = loss.new_full((), prior_weight)  # a fill kernel, no host-to-device copy
        return loss, scalars

    return step_fn


def train_tokenizer(name: str, tokenizer: torch.nn.Module, batches: BatchStream, stage: StageConfig,
                    tvc: TVCConfig, ctx: StageContext, prior_term: Optional[Any] = None) -> StageSummary:
    """Likelihood + posterior training (stage A, and stage C of two_stage), plus the prior term of
    joint or wartok in stage C."""
    tokenizer.train()
    step_fn = tokenizer_step_fn(tokenizer, batches, tvc, ctx, prior_term)
    groups = [] if prior_term is None else prior_term.param_groups()
    after = None if prior_term is None else prior_term.after_step
    if after is not None and dist.world_size() > 1 and hasattr(prior_term, "upkeep_batch"):
        after = upkeep_on_global_batch(prior_term, ctx.device)
    stateful = {"model": tokenizer, "batches": batches, "prior_term": prior_term}
    return run_stage(name, tokenizer.parameters(), stage, step_fn, ctx, groups, after, stateful)


def upkeep_on_global_batch(prior_term: Any, device: torch.device) -> AfterStepFn:
    """Data-parallel runs: the WGF term's tracker/target upkeep trains on the step's tokens, by
    its own optimizers, outside the loop's gradient averaging. On the whole global batch,
    gathered in rank order (= the one-process batch), and with random draws (the ARs' dropout)
    seeded alike on every rank by (a number drawn here, before the loop seeds per rank, and the
    step), every rank keeps the same AR models, and a resumed stage draws the same numbers."""
    base = int(torch.randint(2**31 - 1, ()))  # from the stage's stream, the same on every rank

    def after(step: int) -> dict[str, torch.Tensor]:
        tokens, labels = prior_term.upkeep_batch()
        batch = (dist.all_gather_cat(tokens), dist.all_gather_cat(labels))
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(base + step)
            return prior_term.after_step(step, batch)

    return after


def train_prior(name: str, prior: torch.nn.Module, batches: BatchStream, stage: StageConfig,
                ctx: StageContext) -> StageSummary:
    """Next-token maximum likelihood on frozen token sequences (stages B and D)."""
    conditional = prior.config.num_classes > 0
    prior.train()

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tokens, labels = next(batches)
        tokens = tokens.to(ctx.device, non_blocking=True)  # (B, T)
        cond = labels.to(ctx.device) if conditional else None
        with autocast(ctx.device, ctx.precision):
            _, loss = prior(tokens, cond=cond, targets=tokens)
        return loss, {"loss": loss}

    return run_stage(name, prior.parameters(), stage, step_fn, ctx, stateful={"model": prior, "batches": batches})
