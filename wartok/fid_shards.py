"""Sharded gFID: many jobs each sample and featurise a slice of the set, one merge step scores it.

The paper's convention is gFID on 50k samples; at ImageNet scale generating and featurising
them is worth spreading over an array of jobs. Shard i of S draws samples [start, stop) of the
whole class-balanced set (`shard_range`; sample j has class j mod num_classes, as in the
unsharded evaluation), extracts their features and saves their sufficient statistics: for the
FID layer the count, the mean and the centred scatter matrix (float64, merged with Chan et al.'s
pairwise update, which avoids the cancellation of sum-of-outer-products minus n mu mu^T), and
the raw KID and logits rows (KID's subsets and IS's splits draw from all samples in order, so
the merge concatenates them). Merging gives the FID/KID/IS the unsharded computation gives on
the same samples (FID to float64 rounding: 2e-8 relative in tests/test_fid_shards.py).

    python -m wartok.fid_shards shard RUN_DIR --shard $SLURM_ARRAY_TASK_ID --num-shards 8 device=cuda
    python -m wartok.fid_shards merge RUN_DIR --num-shards 8 device=cuda [metrics.reference_npz=REF.npz]

RUN_DIR is a finished run's folder (its .hydra/config.yaml and checkpoints/tokenizer.pt,
eval_prior.pt); KEY=VALUE arguments override its settings (metrics.gfid_samples, device,
eval.sample_cfg_scale, ...) and must be the same for every shard and the merge. Shards land in
RUN_DIR/gfid_shards/, the merged entries in RUN_DIR/gfid_shards/merged.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf

from wartok import metrics
from wartok.checkpoint import load_checkpoint
from wartok.config import load_run_config
from wartok.data import build_data
from wartok.evaluate import samples_uint8
from wartok.fid_features import Extractor, extract_features, load_extractor
from wartok.fid_reference import ImagesOrLoader, ReferenceKey
from wartok.metrics import MetricsConfig
from wartok.models import GPT, TOKENIZERS
from wartok.pipeline import stage_seed
from wartok.results import atomic_write_text, atomic_writer
from wartok.runtime import resolve_device
from wartok.validate import ConfigError

SHARD_FORMAT = 1
SHARD_SEED_STRIDE = 1_000_003  # shard i samples with seed + i * this; shard 0 uses the unsharded seed


def shard_range(total: int, shard: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of shard `shard` of `num_shards` contiguous, near-equal slices of `total` samples."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    if num_shards > total:
        raise ValueError(f"{num_shards} shards for {total} samples: some would be empty")
    return shard * total // num_shards, (shard + 1) * total // num_shards


@dataclass
class ShardStatistics:
    """What one shard saves: enough to merge into the whole set's FID, KID and IS."""

    shard: int
    num_shards: int
    total: int                          # samples in the whole set
    start: int                          # index of this shard's first sample in the whole set
    n: int
    mean: np.ndarray                    # (D,) float64, FID layer
    scatter: np.ndarray                 # (D, D) float64: sum over samples of (x - mean)(x - mean)^T
    kid_features: np.ndarray            # (n, Dk) float32, KID layer rows in sample order
    isc_features: Optional[np.ndarray]  # (n, C) float32 logits, or None when IS is unavailable
    identity: str                       # JSON every shard of one set must share (extractor, layers, sampling)


def shard_identity(ex: Extractor, total: int, num_shards: int, tag: dict[str, Any]) -> str:
    return json.dumps({"format": SHARD_FORMAT, "extractor": ex.name, "weights_sha256": ex.weights_sha256,
                       "fid_layer": ex.fid_layer, "kid_layer": ex.kid_layer, "isc_layer": ex.isc_layer,
                       "total": total, "num_shards": num_shards, "tag": tag}, sort_keys=True)


def shard_statistics(samples: torch.Tensor, cfg: MetricsConfig, device: torch.device, shard: int, num_shards: int,
                     total: int, tag: Optional[dict[str, Any]] = None) -> ShardStatistics:
    """Features of this shard's samples (uint8 (n, 3, H, W), samples [start, stop) of the set)
    reduced to its ShardStatistics. `tag` names what must agree across shards (checkpoints,
    sampling settings)."""
    start, stop = shard_range(total, shard, num_shards)
    if len(samples) != stop - start:
        raise ValueError(f"shard {shard} of {num_shards} over {total} samples holds {stop - start}, got {len(samples)}")
    ex = load_extractor(cfg, device, isc=cfg.isc)
    feats = extract_features(samples, ex, cfg)
    fid = feats[ex.fid_layer].double().numpy()
    mean = fid.mean(axis=0)
    centred = fid - mean
    isc = feats[ex.isc_layer].numpy() if ex.isc_layer and ex.isc_layer in feats else None
    return ShardStatistics(shard=shard, num_shards=num_shards, total=total, start=start, n=len(samples), mean=mean,
                           scatter=centred.T @ centred, kid_features=feats[ex.kid_layer].numpy(), isc_features=isc,
                           identity=shard_identity(ex, total, num_shards, tag or {}))


def save_shard(path: Path, stats: ShardStatistics) -> Path:
    """Atomically (temp file, fsync, rename), as an .npz of plain arrays (no pickles)."""
    arrays = {"shard": np.int64(stats.shard), "num_shards": np.int64(stats.num_shards), "total": np.int64(stats.total),
              "start": np.int64(stats.start), "n": np.int64(stats.n), "mean": stats.mean, "scatter": stats.scatter,
              "kid_features": stats.kid_features, "identity": np.str_(stats.identity)}
    if stats.isc_features is not None:
        arrays["isc_features"] = stats.isc_features
    with atomic_writer(path, "wb") as f:
        np.savez(f, **arrays)
    return Path(path)


def load_shard(path: Path) -> ShardStatistics:
    with np.load(path, allow_pickle=False) as z:
        ints = {k: int(z[k]) for k in ("shard", "num_shards", "total", "start", "n")}
        return ShardStatistics(**ints, mean=z["mean"], scatter=z["scatter"], kid_features=z["kid_features"],
                               isc_features=z["isc_features"] if "isc_features" in z.files else None,
                               identity=str(z["identity"]))


@dataclass
class MergedStatistics:
    n: int
    mu: np.ndarray            # (D,)
    sigma: np.ndarray         # (D, D), unbiased (n - 1), as torch-fidelity's np.cov
    kid_features: np.ndarray  # (n, Dk) in sample order
    isc_features: Optional[np.ndarray]
    identity: str


def merge_statistics(shards: Sequence[ShardStatistics]) -> MergedStatistics:
    """One set's statistics from all of its shards (any order); refuses a missing, repeated or
    foreign shard, so a merged number always covers exactly the samples it claims."""
    if not shards:
        raise ValueError("no shards to merge")
    shards = sorted(shards, key=lambda s: s.shard)
    first = shards[0]
    if any(s.identity != first.identity for s in shards):
        raise ValueError("the shards come from different settings (extractor, sample count, shard count or "
                         "checkpoints differ); merge only shards of one set")
    found = [s.shard for s in shards]
    if found != list(range(first.num_shards)):
        missing = sorted(set(range(first.num_shards)) - set(found))
        raise ValueError(f"expected shards 0..{first.num_shards - 1} once each; missing {missing}, found {found}")
    for s in shards:
        if (s.start, s.start + s.n) != shard_range(s.total, s.shard, s.num_shards):
            raise ValueError(f"shard {s.shard} holds samples [{s.start}, {s.start + s.n}), expected "
                             f"{shard_range(s.total, s.shard, s.num_shards)}")
    n, mean, scatter = first.n, first.mean.astype(np.float64), first.scatter.astype(np.float64)
    for s in shards[1:]:  # Chan, Golub & LeVeque's pairwise update of (count, mean, centred scatter)
        delta = s.mean - mean
        merged = n + s.n
        scatter = scatter + s.scatter + np.outer(delta, delta) * (n * s.n / merged)
        mean = mean + delta * (s.n / merged)
        n = merged
    isc = None if any(s.isc_features is None for s in shards) else np.concatenate([s.isc_features for s in shards])
    return MergedStatistics(n=n, mu=mean, sigma=scatter / (n - 1),
                            kid_features=np.concatenate([s.kid_features for s in shards]), isc_features=isc,
                            identity=first.identity)


def merged_generation_metrics(shards: Sequence[ShardStatistics], reference: ImagesOrLoader,
                              cfg: MetricsConfig, seed: int, device: torch.device,
                              reference_key: ReferenceKey) -> dict[str, dict]:
    """{"gfid", "gkid", "is"} of the merged shards, the entries `metrics.generation_metrics`
    gives for the same samples unsharded (the same reference rules: the training images under
    `reference_key`, or cfg.reference_npz), plus the number of shards."""
    merged = merge_statistics(shards)
    ex = load_extractor(cfg, device, isc=cfg.isc)
    made_with = json.loads(merged.identity)
    if (made_with["extractor"], made_with["weights_sha256"]) != (ex.name, ex.weights_sha256):
        raise ValueError(f"the shards were featurised by {made_with['extractor']} (weights sha256 "
                         f"{made_with['weights_sha256'][:16]}), the merge's extractor is {ex.name} "
                         f"({ex.weights_sha256[:16]})")
    feats = {ex.kid_layer: torch.from_numpy(merged.kid_features)}
    if merged.isc_features is not None and ex.isc_layer:
        feats[ex.isc_layer] = torch.from_numpy(merged.isc_features)
    ref = metrics.gfid_reference(reference, cfg, device, reference_key, ex)
    out = metrics.generation_entries(feats, merged.n, ref, ex, cfg, seed, fid_stats=(merged.mu, merged.sigma))
    for entry in out.values():
        entry["shards"] = len(shards)
    return out


# ----------------------------------------------------------------------------- run folders (CLI)
def shard_path(run_dir: Path, shard: int, num_shards: int) -> Path:
    return Path(run_dir) / "gfid_shards" / f"shard_{shard:05d}_of_{num_shards:05d}.npz"


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_run(run_dir: Path, overrides: Sequence[str]):
    """(RunConfig, device, tokenizer, eval prior) of a finished run, its settings overridden by KEY=VALUE."""
    node = OmegaConf.load(Path(run_dir) / ".hydra" / "config.yaml")
    node = OmegaConf.merge(node, OmegaConf.from_dotlist(list(overrides)))
    cfg = load_run_config(node)
    device = resolve_device(cfg.device)
    _, tokenizer_cls = TOKENIZERS[cfg.tokenizer.name]
    models = []
    for name, model in (("tokenizer.pt", tokenizer_cls(cfg.tokenizer)), ("eval_prior.pt", GPT(cfg.prior))):
        model.load_state_dict(load_checkpoint(Path(run_dir) / "checkpoints" / name, map_location="cpu")["model"])
        models.append(model.to(device).eval())
    return cfg, device, models[0], models[1]


def run_tag(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """What every shard of one set must share besides the extractor: checkpoints and sampling."""
    e = cfg.eval
    return {"tokenizer_sha256": _file_sha256(Path(run_dir) / "checkpoints" / "tokenizer.pt"),
            "eval_prior_sha256": _file_sha256(Path(run_dir) / "checkpoints" / "eval_prior.pt"),
            "temperature": e.sample_temperature, "top_k": e.sample_top_k, "top_p": e.sample_top_p,
            "cfg_scale": e.sample_cfg_scale, "seed": eval_seed(cfg)}


def eval_seed(cfg: Any) -> int:
    return stage_seed(cfg, "d")  # the seed of the run's own (unsharded) stage-D samples


def run_shard(run_dir: Path, shard: int, num_shards: int, overrides: Sequence[str] = ()) -> Path:
    """Sample, featurise and save shard `shard` of a finished run's gFID set."""
    cfg, device, tokenizer, prior = load_run(run_dir, overrides)
    total = cfg.metrics.gfid_samples
    start, stop = shard_range(total, shard, num_shards)
    e = cfg.eval
    samples = samples_uint8(tokenizer, prior, stop - start, cfg.data.eval_batch_size, device, cfg.precision,
                            e.sample_temperature, e.sample_top_k, e.sample_top_p,
                            eval_seed(cfg) + SHARD_SEED_STRIDE * shard, cfg_scale=e.sample_cfg_scale, start=start,
                            cuda_graph=e.sample_cuda_graph)
    stats = shard_statistics(samples, cfg.metrics, device, shard, num_shards, total, run_tag(cfg, run_dir))
    return save_shard(shard_path(run_dir, shard, num_shards), stats)


def run_merge(run_dir: Path, num_shards: int, overrides: Sequence[str] = ()) -> dict[str, dict]:
    """Merge a run's saved shards (all `num_shards` of them) into gfid/gkid/is entries, written
    to gfid_shards/merged.json."""
    cfg, device, _, _ = load_run(run_dir, overrides)
    folder = Path(run_dir) / "gfid_shards"
    shards = [load_shard(p) for p in sorted(folder.glob(f"shard_*_of_{num_shards:05d}.npz"))]
    if not shards:
        raise ValueError(f"no shards of {num_shards} in {folder}; run `python -m wartok.fid_shards shard` first")
    m = cfg.metrics
    key, reference = None, None
    if m.reference_npz is None:  # the training images, under the same cache key as the run's own gFID
        data = build_data(cfg.data, seed=cfg.seed)
        source = f"{data.source}|train_subset={cfg.data.train_subset}|heldout_subset={cfg.data.heldout_subset}"
        n_train = len(metrics.subset_indices(len(data.train), m.reference_samples))
        key = ReferenceKey(cfg.data.name, "train", data.image_size, n_train, data.channels, source)
        reference = lambda: metrics.dataset_uint8(data.train, m.reference_samples,  # noqa: E731 (called on a miss)
                                                  num_workers=cfg.data.num_workers)
    out = merged_generation_metrics(shards, reference, m, eval_seed(cfg), device, key)
    text = json.dumps({"metrics": out, "run_dir": str(run_dir), "overrides": list(overrides)}, indent=2, sort_keys=True)
    atomic_write_text(folder / "merged.json", text + "\n")
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wartok.fid_shards", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    shard = sub.add_parser("shard", help="sample and featurise one shard of a finished run's gFID set")
    shard.add_argument("run_dir", type=Path)
    shard.add_argument("--shard", type=int, required=True)
    shard.add_argument("--num-shards", type=int, required=True)
    merge = sub.add_parser("merge", help="merge the saved shards into gfid/gkid/is")
    merge.add_argument("run_dir", type=Path)
    merge.add_argument("--num-shards", type=int, required=True)
    for p in (shard, merge):
        p.add_argument("overrides", nargs="*", help="KEY=VALUE settings over the run's config (same for every call)")
    args, rest = parser.parse_known_args(argv)  # KEY=VALUE may also follow the options
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *rest]
    try:
        if args.command == "shard":
            print(f"shard saved: {run_shard(args.run_dir, args.shard, args.num_shards, args.overrides)}")
            return 0
        out = run_merge(args.run_dir, args.num_shards, args.overrides)
    except (ConfigError, ValueError) as err:
        print(f"wartok.fid_shards: {err}", file=sys.stderr)
        return 2
    gfid = out["gfid"]
    print(f"gfid {gfid['value']} on {gfid['n']} samples in {gfid['shards']} shards, reference {gfid['reference']}")
    print(f"merged: {Path(args.run_dir) / 'gfid_shards' / 'merged.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
