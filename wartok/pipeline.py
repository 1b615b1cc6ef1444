"""One run of METHOD.md's pipeline: A (tokenizer), B (target prior), C (method), D (evaluation).

`prepare` does everything that can fail on bad input (device, data location, model configs)
before any compute; `run_pipeline` then trains and measures, writing checkpoints, images and
per-step scalars into the run folder. Each stage reseeds from the run seed and its own index,
so stage D's evaluation prior starts from the same weights for every method.

Data-parallel runs (wartok/dist.py): every rank runs this same pipeline on its slices of the
batches; only rank 0 writes (scalars, checkpoints, images, stage-cache entries) and computes
the fidelity metrics, whose reference statistics are cached on disk too.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from torch.utils.data import Subset

from wartok import dist
from wartok.cache import StageCache, default_cache_dir, stage_key
from wartok.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from wartok.config import RunConfig
from wartok.data import DataBundle, build_data
from wartok.evaluate import (code_histogram_stats, heldout_nll, reconstruction_psnr, reconstructions_uint8,
                             samples_uint8, save_reconstruction_grid, save_sample_grid)
from wartok.fid_features import INCEPTION
from wartok.fid_reference import ReferenceKey
from wartok.method import build_prior_term
from wartok.metrics import dataset_uint8, generation_metrics, reconstruction_metrics, subset_indices
from wartok.models import TOKENIZERS, GPT
from wartok.results import ScalarLog, flatten, metric
from wartok.runtime import configure_backends, maybe_compile, resolve_device, seed_everything
from wartok.validate import ConfigError
from wartok.weights import resolve_inception_weights
from wartok.stages import StageContext, train_prior, train_tokenizer
from wartok.stream import BatchStream, shard
from wartok.tokens import extract_tokens, token_loader

STAGE_SEED_OFFSET = {"a": 1, "b": 2, "c": 3, "d": 4}
STAGES = tuple(STAGE_SEED_OFFSET)


@dataclass
class Prepared:
    cfg: RunConfig
    device: torch.device
    data: DataBundle
    dist_info: dist.DistInfo = dist.DistInfo()  # rank and world of a data-parallel run (from the environment)


def prepare(cfg: RunConfig) -> Prepared:
    """Validate what depends on the machine (device, data on disk); raises ConfigError, spends no compute."""
    info = dist.detect()
    device = dist.local_device(resolve_device(cfg.device), info)
    for stage in ("stage_b", "stage_d"):
        dist.per_rank_batch(f"{stage}.batch_size", getattr(cfg, stage).batch_size, info.world_size)
    if cfg.checkpoint.resume and not Path(cfg.checkpoint.resume).is_file():
        raise ConfigError(f"checkpoint.resume={cfg.checkpoint.resume} does not exist; give an existing "
                          "checkpoints/stage_<x>/step_<n>.pt file, or leave it unset to resume from the run folder")
    configure_backends(device)
    data = build_data(cfg.data, seed=cfg.seed, device_type=device.type, rank=info.rank, world=info.world_size)
    if data.image_size != cfg.tokenizer.image_size or data.channels != cfg.tokenizer.in_channels:
        raise ConfigError(
            f"tokenizer.image_size={cfg.tokenizer.image_size} / tokenizer.in_channels={cfg.tokenizer.in_channels} "
            f"must match the data ({data.image_size} px, {data.channels} channels)")
    if cfg.prior.num_classes and cfg.prior.num_classes != data.num_classes:
        # class-balanced samples ask for every class the prior knows; classes without data would be noise
        raise ConfigError(f"prior.num_classes={cfg.prior.num_classes} must equal the data's class count "
                          f"{data.num_classes} (or be 0: an unconditional prior)")
    if cfg.metrics.enabled and cfg.metrics.feature_extractor == INCEPTION:
        resolve_inception_weights(cfg.metrics.inception_weights)  # no weights: ConfigError naming the fix
    return Prepared(cfg=cfg, device=device, data=data, dist_info=info)


def stage_seed(cfg: RunConfig, stage: str) -> int:
    return cfg.seed * 100 + STAGE_SEED_OFFSET[stage]


def run_pipeline(prep: Prepared, out_dir: Path) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """Train and evaluate; returns (metrics, artifacts, stage provenance).

    Artifact paths are relative to out_dir, except the shared stages' files, which live in the
    stage cache (absolute paths). Provenance says which cache entries were built or reused.
    """
    cfg, device, data = prep.cfg, prep.device, prep.data
    checkpoints = out_dir / "checkpoints"
    resumed_offset = log_offset_to_resume(checkpoints)  # None: a fresh run
    log = ScalarLog(out_dir / "scalars.jsonl" if dist.is_main() else None, truncate_to=resumed_offset)
    ctx = StageContext(device=device, precision=cfg.precision, log=log, checkpoint=cfg.checkpoint,
                       checkpoint_dir=checkpoints, config=checkpointed_config(cfg))
    try:
        tokenizer, target, target_nll, artifacts, provenance = shared_stages(cfg, data, ctx, out_dir,
                                                                             log_cached=resumed_offset is None)
        stage_c(cfg, data, tokenizer, target, ctx)
        artifacts["tokenizer"] = _save(out_dir, "tokenizer.pt", tokenizer, cfg)
        metrics, eval_prior = stage_d(cfg, data, tokenizer, ctx)
        metrics["target_ar_loss_stage_a_tokens"] = metric(target_nll, n=metrics["ar_loss"]["n"], unit="nats/token")
        artifacts["eval_prior"] = _save(out_dir, "eval_prior.pt", eval_prior, cfg)
        artifacts.update(save_grids(cfg, data, tokenizer, eval_prior, device, out_dir))
    finally:
        log.close()
    artifacts["scalars"] = "scalars.jsonl"
    return metrics, artifacts, provenance


def log_offset_to_resume(checkpoints: Path) -> Optional[int]:
    """Where the scalars log of a resumed run must be cut: at the latest checkpoint of the last
    stage that has one (what was logged after it will be logged again). None: nothing to resume."""
    for stage in reversed(STAGES):
        pointer = checkpoints / f"stage_{stage}" / "latest"
        if pointer.is_file():
            return int(load_checkpoint(pointer.parent / pointer.read_text().strip())["log_offset"])
    return None


def checkpointed_config(cfg: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint must agree with: all but the checkpoint settings themselves."""
    return {k: v for k, v in flatten(dataclasses.asdict(cfg)).items() if not k.startswith("checkpoint.")}


def shared_stages(cfg: RunConfig, data: DataBundle, ctx: StageContext, out_dir: Path, log_cached: bool = True):
    """Stages A and B: from the stage cache (built once per key, see wartok/cache.py) or, with
    reuse_stages=false, trained inside this run (and checkpointed there). The run's scalars.jsonl
    gets the cached stages' curves once (log_cached: not again when a run resumes)."""
    if not cfg.reuse_stages:
        tokenizer = stage_a(cfg, data, ctx)
        target, target_nll = stage_b(cfg, data, tokenizer, ctx)
        artifacts = {"tokenizer_a": _save(out_dir, "tokenizer_a.pt", tokenizer, cfg),
                     "target_prior": _save(out_dir, "target_prior.pt", target, cfg, heldout_nll=target_nll)}
        return tokenizer, target, target_nll, artifacts, {}
    cache = StageCache(Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir())
    payload_a = stage_a_settings(cfg, ctx.device)
    payload_b = {"stage_a": stage_key("a", payload_a), **stage_b_settings(cfg)}

    # folder None: a data-parallel rank other than 0, which trains along and writes nothing
    def build_a(folder: Optional[Path]) -> None:
        # a cache build restarts from scratch if killed
        with ScalarLog(None if folder is None else folder / "scalars.jsonl") as log:
            tokenizer = stage_a(cfg, data, dataclasses.replace(ctx, log=log, checkpoint_dir=None))
        if folder is not None:
            save_checkpoint(folder / "tokenizer.pt", {"model": tokenizer.state_dict()})

    def build_b(folder: Optional[Path]) -> None:
        with ScalarLog(None if folder is None else folder / "scalars.jsonl") as log:
            target, nll = stage_b(cfg, data, tokenizer, dataclasses.replace(ctx, log=log, checkpoint_dir=None))
        if folder is not None:
            save_checkpoint(folder / "target_prior.pt", {"model": target.state_dict(), "heldout_nll": nll})

    tokenizer, hit_a = cache.get_or_build(payload_b["stage_a"], payload_a, build_a,
                                          lambda folder: _load_model(folder / "tokenizer.pt", new_tokenizer(cfg, ctx)))
    (target, target_nll), hit_b = cache.get_or_build(stage_key("b", payload_b), payload_b, build_b,
                                                     lambda folder: _load_prior(folder / "target_prior.pt", cfg, ctx))
    for hit in (hit_a, hit_b) if log_cached else ():
        ctx.log.extend(hit.folder / "scalars.jsonl")
    artifacts = {"tokenizer_a": str(hit_a.folder / "tokenizer.pt"), "target_prior": str(hit_b.folder / "target_prior.pt")}
    provenance = {name: {"key": hit.key, "reused": hit.reused, "folder": str(hit.folder)}
                  for name, hit in (("a", hit_a), ("b", hit_b))}
    return tokenizer, target, target_nll, artifacts, provenance


def stage_a_settings(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """Exactly what stage A's result depends on (not where the data lives, nor eval settings)."""
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k not in ("root", "download", "num_workers",
                                                                             "eval_batch_size", "heldout_subset")}
    return {"data": data, "tokenizer": dataclasses.asdict(cfg.tokenizer),
            "likelihood": dataclasses.asdict(cfg.tvc.likelihood), "posterior": dataclasses.asdict(cfg.tvc.posterior),
            "stage_a": dataclasses.asdict(cfg.stage_a), "seed": cfg.seed, "precision": cfg.precision,
            "compile": cfg.compile, "device": device.type}


def stage_b_settings(cfg: RunConfig) -> dict[str, Any]:
    """What stage B adds to stage A's settings (its held-out NLL also depends on the held-out subset)."""
    return {"prior": dataclasses.asdict(cfg.prior), "stage_b": dataclasses.asdict(cfg.stage_b),
            "heldout_subset": cfg.data.heldout_subset}


def new_tokenizer(cfg: RunConfig, ctx: StageContext) -> torch.nn.Module:
    _, tokenizer_cls = TOKENIZERS[cfg.tokenizer.name]
    tokenizer = tokenizer_cls(cfg.tokenizer).to(ctx.device)
    # a layout, not a setting of the model: it changes float rounding only, so it is not in the
    # stage-cache key (a loaded state dict is copied into these NHWC parameters as it is)
    return tokenizer.to(memory_format=torch.channels_last) if cfg.channels_last else tokenizer


def _load_model(path: Path, model: torch.nn.Module) -> torch.nn.Module:
    try:
        model.load_state_dict(load_checkpoint(path, map_location=next(model.parameters()).device)["model"])
    except RuntimeError as err:  # a state dict that does not fit this model
        raise CheckpointError(f"checkpoint {path} does not fit the model: {str(err).splitlines()[0]}") from None
    return model


def _load_prior(path: Path, cfg: RunConfig, ctx: StageContext) -> tuple[torch.nn.Module, float]:
    state = load_checkpoint(path, map_location=ctx.device)
    return _load_model(path, GPT(cfg.prior).to(ctx.device)), float(state["heldout_nll"])


def stage_a(cfg: RunConfig, data: DataBundle, ctx: StageContext) -> torch.nn.Module:
    """Tokenizer pretraining (likelihood + posterior), shared by every method."""
    seed_everything(stage_seed(cfg, "a"))
    tokenizer = new_tokenizer(cfg, ctx)
    batches = BatchStream(data.train_loader, stage_seed(cfg, "a"))  # the order depends on the stage seed alone
    train_tokenizer("a", maybe_compile(tokenizer, cfg.compile), batches, cfg.stage_a, cfg.tvc, ctx)
    return tokenizer


def stage_b(cfg: RunConfig, data: DataBundle, tokenizer: torch.nn.Module,
            ctx: StageContext) -> tuple[torch.nn.Module, float]:
    """The target prior, fitted to the frozen tokens of stage A; returns it and its held-out NLL."""
    seed_everything(stage_seed(cfg, "b"))
    prior = fit_prior("b", cfg, data, tokenizer, cfg.stage_b, ctx)
    tokens, labels = extract_tokens(tokenizer, data.heldout, cfg.data.eval_batch_size, ctx.device, ctx.precision,
                                    num_workers=cfg.data.num_workers)
    return prior, heldout_nll(prior, tokens, labels, cfg.data.eval_batch_size, ctx.device)


def stage_c(cfg: RunConfig, data: DataBundle, tokenizer: torch.nn.Module, target: torch.nn.Module,
            ctx: StageContext) -> None:
    """The method stage from stage A's tokenizer, the same budget for every method.

    two_stage keeps the stage-A objective; joint adds the AR cross-entropy, wartok the WGF
    signal (wartok/method.py), both around a copy of stage B's target, which stays untouched.
    """
    seed_everything(stage_seed(cfg, "c"))
    if cfg.stage_c.steps == 0:
        return
    prior_term = build_prior_term(cfg.method, target, cfg.tvc.prior, seed=stage_seed(cfg, "c"),
                                  precision=cfg.precision)
    batches = BatchStream(data.train_loader, stage_seed(cfg, "c"))
    train_tokenizer("c", maybe_compile(tokenizer, cfg.compile), batches, cfg.stage_c, cfg.tvc, ctx,
                    prior_term=prior_term)


def stage_d(cfg: RunConfig, data: DataBundle, tokenizer: torch.nn.Module,
            ctx: StageContext) -> tuple[dict[str, Any], torch.nn.Module]:
    """Freeze the tokenizer, fit a fresh evaluation prior (same seed for every method), measure."""
    seed_everything(stage_seed(cfg, "d"))
    tokenizer.eval().requires_grad_(False)
    prior = fit_prior("d", cfg, data, tokenizer, cfg.stage_d, ctx)
    tokens, labels = extract_tokens(tokenizer, data.heldout, cfg.data.eval_batch_size, ctx.device, ctx.precision,
                                    num_workers=cfg.data.num_workers)
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
    if cfg.metrics.enabled and dist.is_main():  # one rank suffices; it writes the reference statistics' cache
        metrics.update(fidelity_metrics(cfg, data, tokenizer, prior, ctx))
    return metrics, prior


def fidelity_metrics(cfg: RunConfig, data: DataBundle, tokenizer: torch.nn.Module, prior: torch.nn.Module,
                     ctx: StageContext) -> dict[str, Any]:
    """rFID/rKID on held-out reconstructions, gFID/gKID/IS on decoded samples (wartok/metrics.py).

    The real-image statistics are cached under a key naming the data set, split and subset, so
    every method and seed of a sweep compares against the same, once-extracted reference.
    """
    m, seed = cfg.metrics, stage_seed(cfg, "d")
    source = f"{data.source}|train_subset={cfg.data.train_subset}|heldout_subset={cfg.data.heldout_subset}"
    heldout = Subset(data.heldout, subset_indices(len(data.heldout), m.rfid_samples))
    recon = reconstructions_uint8(tokenizer, heldout, cfg.data.eval_batch_size, ctx.device, ctx.precision)
    heldout_key = ReferenceKey(cfg.data.name, "heldout", data.image_size, len(heldout), data.channels, source)
    workers = cfg.data.num_workers
    out = reconstruction_metrics(recon, lambda: dataset_uint8(heldout, num_workers=workers), m, seed, ctx.device,
                                 heldout_key)
    e = cfg.eval
    samples = samples_uint8(tokenizer, prior, m.gfid_samples, cfg.data.eval_batch_size, ctx.device, ctx.precision,
                            e.sample_temperature, e.sample_top_k, e.sample_top_p, seed, cfg_scale=e.sample_cfg_scale,
                            cuda_graph=e.sample_cuda_graph)
    n_train = len(subset_indices(len(data.train), m.reference_samples))
    train_key = ReferenceKey(cfg.data.name, "train", data.image_size, n_train, data.channels, source)
    out.update(generation_metrics(samples, lambda: dataset_uint8(data.train, m.reference_samples, num_workers=workers),
                                  m, seed, ctx.device, train_key))
    return out


def fit_prior(name: str, cfg: RunConfig, data: DataBundle, tokenizer: torch.nn.Module, stage, ctx: StageContext):
    """A fresh prior trained on the frozen tokenizer's training-set tokens."""
    tokens, labels = extract_tokens(tokenizer, data.train, cfg.data.eval_batch_size, ctx.device, ctx.precision,
                                    desc=f"stage {name} tokens", num_workers=cfg.data.num_workers)
    prior = GPT(cfg.prior).to(ctx.device)
    loader = token_loader(tokens, labels, stage.batch_size, seed=0)
    if dist.world_size() > 1:  # stage.batch_size is the global batch; this rank trains on its slice
        loader = shard(loader, dist.rank(), dist.world_size())
    batches = BatchStream(loader, stage_seed(cfg, name))
    train_prior(name, maybe_compile(prior, cfg.compile), batches, stage, ctx)
    return prior


def save_grids(cfg: RunConfig, data: DataBundle, tokenizer: torch.nn.Module, prior: torch.nn.Module,
               device: torch.device, out_dir: Path) -> dict[str, str]:
    if not dist.is_main():
        return {}
    count = cfg.eval.num_grid_images
    save_reconstruction_grid(tokenizer, data.heldout, count, out_dir / "reconstructions.png", device)
    save_sample_grid(tokenizer, prior, count, out_dir / "samples.png", device, cfg.eval.sample_temperature,
                     cfg.eval.sample_top_k, cfg.eval.sample_top_p, seed=stage_seed(cfg, "d"),
                     cfg_scale=cfg.eval.sample_cfg_scale)
    return {"reconstructions": "reconstructions.png", "samples": "samples.png"}


def _save(out_dir: Path, name: str, model: torch.nn.Module, cfg: RunConfig, **extra: Any) -> str:
    if dist.is_main():
        state = {"model": model.state_dict(), "method": cfg.method, **extra}
        save_checkpoint(out_dir / "checkpoints" / name, state)
    return f"checkpoints/{name}"
