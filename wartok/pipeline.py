"""One run of METHOD.md's pipeline: A (tokenizer), B (target prior), C (method), D (evaluation).

`prepare` does everything that can fail on bad input (device, data location, model configs)
before any compute; `run_pipeline` then trains and measures, writing checkpoints, images and
per-step scalars into the run folder. Each stage reseeds from the run seed and its own index,
so stage D's evaluation prior starts from the same weights for every method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wartok.checkpoint import save_checkpoint
from wartok.config import RunConfig
from wartok.data import DataBundle, build_data
from wartok.evaluate import (code_histogram_stats, heldout_nll, reconstruction_psnr, save_reconstruction_grid,
                             save_sample_grid)
from wartok.models import TOKENIZERS, GPT
from wartok.results import ScalarLog, metric
from wartok.runtime import configure_backends, maybe_compile, resolve_device, seed_everything
from wartok.validate import ConfigError
from wartok.stages import StageContext, train_prior, train_tokenizer
from wartok.tokens import extract_tokens, token_loader

STAGE_SEED_OFFSET = {"a": 1, "b": 2, "c": 3, "d": 4}


@dataclass
class Prepared:
    cfg: RunConfig
    device: torch.device
    data: DataBundle


def prepare(cfg: RunConfig) -> Prepared:
    """Validate what depends on the machine (device, data on disk); raises ConfigError, spends no compute."""
    device = resolve_device(cfg.device)
    data = build_data(cfg.data, seed=cfg.seed, device_type=device.type)
    if data.image_size != cfg.tokenizer.image_size or data.channels != cfg.tokenizer.in_channels:
        raise ConfigError(
            f"tokenizer.image_size={cfg.tokenizer.image_size} / tokenizer.in_channels={cfg.tokenizer.in_channels} "
            f"must match the data ({data.image_size} px, {data.channels} channels)")
    return Prepared(cfg=cfg, device=device, data=data)


def stage_seed(cfg: RunConfig, stage: str) -> int:
    return cfg.seed * 100 + STAGE_SEED_OFFSET[stage]


def run_pipeline(prep: Prepared, out_dir: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Train and evaluate; returns (metrics, artifacts) with artifact paths relative to out_dir."""
    cfg, device, data = prep.cfg, prep.device, prep.data
    configure_backends(device)
    log = ScalarLog(out_dir / "scalars.jsonl")
    ctx = StageContext(device=device, precision=cfg.precision, log=log)
    artifacts: dict[str, str] = {}
    try:
        tokenizer = stage_a(cfg, data, ctx)
        artifacts["tokenizer_a"] = _save(out_dir, "tokenizer_a.pt", tokenizer, cfg)
        target, target_nll = stage_b(cfg, data, tokenizer, ctx)
        artifacts["target_prior"] = _save(out_dir, "target_prior.pt", target, cfg)
        stage_c(cfg, data, tokenizer, ctx)
        artifacts["tokenizer"] = _save(out_dir, "tokenizer.pt", tokenizer, cfg)
        metrics, eval_prior = stage_d(cfg, data, tokenizer, ctx)
        metrics["target_ar_loss_stage_a_tokens"] = metric(target_nll, n=metrics["ar_loss"]["n"])
        artifacts["eval_prior"] = _save(out_dir, "eval_prior.pt", eval_prior, cfg)
        artifacts.update(save_grids(cfg, data, tokenizer, eval_prior, device, out_dir))
    finally:
        log.close()
    artifacts["scalars"] = "scalars.jsonl"
    return metrics, artifacts


def stage_a(cfg: RunConfig, data: DataBundle, ctx: StageContext) -> torch.nn.Module:
    """Tokenizer pretraining (likelihood + posterior), shared by every method."""
    seed_everything(stage_seed(cfg, "a"))
    _, tokenizer_cls = TOKENIZERS[cfg.tokenizer.name]
    tokenizer = tokenizer_cls(cfg.tokenizer).to(ctx.device)
    train_tokenizer("a", maybe_compile(tokenizer, cfg.compile), data.train_loader, cfg.stage_a, cfg.tvc, ctx)
    return tokenizer


def stage_b(cfg: RunConfig, data: DataBundle, tokenizer: torch.nn.Module,
            ctx: StageContext) -> tuple[torch.nn.Module, float]:
    """The target prior, fitted to the frozen tokens of stage A; returns it and its held-out NLL."""
    seed_everything(stage_seed(cfg, "b"))
    prior = fit_prior("b", cfg, data, tokenizer, cfg.stage_b, ctx)
    tokens, labels = extract_tokens(tokenizer, data.heldout, cfg.data.eval_batch_size, ctx.device, ctx.precision)
    return prior, heldout_nll(prior, tokens, labels, cfg.data.eval_batch_size, ctx.device)


def stage_c(cfg: RunConfig, data: DataBundle, tokenizer: torch.nn.Module, ctx: StageContext) -> None:
    """The method stage. two_stage: the tokenizer keeps its stage-A objective for the same budget."""
    seed_everything(stage_seed(cfg, "c"))
    if cfg.stage_c.steps > 0:
        train_tokenizer("c", maybe_compile(tokenizer, cfg.compile), data.train_loader, cfg.stage_c, cfg.tvc, ctx)


def stage_d(cfg: RunConfig, data: DataBundle, tokenizer: torch.nn.Module,
            ctx: StageContext) -> tuple[dict[str, Any], torch.nn.Module]:
    """Freeze the tokenizer, fit a fresh evaluation prior (same seed for every method), measure."""
    seed_everything(stage_seed(cfg, "d"))
    tokenizer.eval().requires_grad_(False)
    prior = fit_prior("d", cfg, data, tokenizer, cfg.stage_d, ctx)
    tokens, labels = extract_tokens(tokenizer, data.heldout, cfg.data.eval_batch_size, ctx.device, ctx.precision)
    nll = heldout_nll(prior, tokens, labels, cfg.data.eval_batch_size, ctx.device)
    n_images, n_tokens = len(data.heldout), tokens.numel()
    psnr = reconstruction_psnr(tokenizer, data.heldout, cfg.data.eval_batch_size, ctx.device, ctx.precision)
    usage = code_histogram_stats(tokens, cfg.tokenizer.quantizer.codebook_size)
    metrics = {
        "ar_loss": metric(nll, n_tokens, unit="nats/token", images=n_images),
        "ar_loss_bits": metric(nll / math.log(2.0), n_tokens, unit="bits/token", images=n_images),
        "psnr": metric(psnr, n_images, unit="dB"),
        "codebook_usage": metric(usage["codebook_usage"], n_images),
        "token_perplexity": metric(usage["token_perplexity"], n_images),
    }
    return metrics, prior


def fit_prior(name: str, cfg: RunConfig, data: DataBundle, tokenizer: torch.nn.Module, stage, ctx: StageContext):
    """A fresh prior trained on the frozen tokenizer's training-set tokens."""
    tokens, labels = extract_tokens(tokenizer, data.train, cfg.data.eval_batch_size, ctx.device, ctx.precision,
                                    desc=f"stage {name} tokens")
    prior = GPT(cfg.prior).to(ctx.device)
    loader = token_loader(tokens, labels, stage.batch_size, seed=stage_seed(cfg, name))
    train_prior(name, maybe_compile(prior, cfg.compile), loader, stage, ctx)
    return prior


def save_grids(cfg: RunConfig, data: DataBundle, tokenizer: torch.nn.Module, prior: torch.nn.Module,
               device: torch.device, out_dir: Path) -> dict[str, str]:
    count = cfg.eval.num_grid_images
    save_reconstruction_grid(tokenizer, data.heldout, count, out_dir / "reconstructions.png", device)
    save_sample_grid(tokenizer, prior, count, out_dir / "samples.png", device, cfg.eval.sample_temperature,
                     cfg.eval.sample_top_k, cfg.eval.sample_top_p, seed=stage_seed(cfg, "d"))
    return {"reconstructions": "reconstructions.png", "samples": "samples.png"}


def _save(out_dir: Path, name: str, model: torch.nn.Module, cfg: RunConfig) -> str:
    save_checkpoint(out_dir / "checkpoints" / name, {"model": model.state_dict(), "method": cfg.method})
    return f"checkpoints/{name}"
