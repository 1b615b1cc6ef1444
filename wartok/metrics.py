"""rFID, gFID, KID and IS through torch-fidelity 0.4.0: offline weights, cached reference statistics.

Everything numerical is torch-fidelity's own code: its feature extractor (``inception-v3-compat``,
weights from ``wartok.weights``), its batched extraction loop, its FID statistics and Frechet
distance, its KID estimator and its Inception Score. This module only feeds it uint8 tensors
(no temporary PNG folders), caches the statistics of real images on disk, and turns the numbers
into the project's metric entries (value, sample counts, extractor, weights checksum, seed,
reliability). FID on fewer than ``MIN_FID_SAMPLES`` images on either side is flagged unreliable;
an Inception Score is recorded only when the extractor has a finite logits layer, else its value
is None with the reason (the weights built offline have none).

The extractor and its feature loop are in ``wartok/fid_features.py``; the on-disk cache of real
images' statistics (mu, sigma of the FID features and up to ``KID_REFERENCE_MAX`` feature rows
for KID, under a content key) is in ``wartok/fid_reference.py``.

A published gFID is computed against a fixed reference, not against whatever training images a
run loads: ``metrics.reference_npz`` takes an ADM-evaluator-style ``.npz`` (``mu``, ``sigma`` of
the reference set's FID features, optionally its ``arr_0`` reference images, uint8 NHWC, for
KID), read with ``allow_pickle=False``. Then no training image is loaded for gFID. Every FID
entry names its reference (``adm_npz:<sha256>`` or ``train split, N images (<data set>)``) and
its feature network, so a number can be checked for comparability with a published table.
Sharded gFID (many jobs, one merged number) is in ``wartok/fid_shards.py``.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import DataLoader, Dataset, Subset
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from wartok import weights
from wartok.data import subset_order
from wartok.fid_features import INCEPTION, Extractor, extract_features, load_extractor
from wartok.fid_reference import (ImagesOrLoader, Reference, ReferenceKey, feature_statistics, npz_kid_key,
                                  reference_statistics)
from wartok.reference_npz import check_reference_npz, load_reference_npz, npz_image_shape, npz_reference_images
from wartok.runtime import ignore_stop_signals
from wartok.validate import ConfigError, check_int

MIN_FID_SAMPLES = 2048       # below this (either side) FID is biased high: flagged reliable=False
TORCH_FIDELITY_VERSION = torch_fidelity.__version__


def _check_bool(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not allowed; it must be true or false")


def _check_optional_path(name: str, value: Optional[str]) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{name}={value!r} is not allowed; it must be a file or folder path, or null")


@dataclass
class MetricsConfig:
    """FID/KID/IS settings. Defaults follow METHOD.md's conventions (rFID on the whole held-out
    split, gFID on 50k samples against the whole training split); CPU experiments shrink them."""

    enabled: bool = True
    inception_weights: Optional[str] = None   # None: $WARTOK_INCEPTION_WEIGHTS, the built file, torch-fidelity's
    feature_extractor: str = INCEPTION        # a name registered with torch-fidelity (tests register a stand-in)
    rfid_samples: int = 0                     # held-out images for rFID/rKID; 0 = all
    gfid_samples: int = 50000                 # generated samples for gFID/gKID/IS
    reference_samples: int = 0                # training images for the gFID reference; 0 = all
    batch_size: int = 64                      # extraction batch
    kid_subset_size: int = 1000               # clamped to the smaller side, which the entry notes
    kid_subsets: int = 100
    isc: bool = True                          # compute IS when the extractor has a logits layer
    isc_splits: int = 10
    cache_dir: Optional[str] = None           # None: $WARTOK_CACHE/fid_stats or ~/.cache/wartok/fid_stats
    num_threads: int = 0                      # CPU threads while extracting; 0 = leave torch's default
    # gFID against a fixed published reference (ADM evaluator's VIRTUAL_imagenet256_labeled.npz...)
    # instead of the run's training images; None: the training split (reference_samples of it)
    reference_npz: Optional[str] = None

    def __post_init__(self):
        for name in ("enabled", "isc"):
            _check_bool(f"metrics.{name}", getattr(self, name))
        _check_optional_path("metrics.inception_weights", self.inception_weights)
        _check_optional_path("metrics.cache_dir", self.cache_dir)
        _check_optional_path("metrics.reference_npz", self.reference_npz)
        if self.reference_npz is not None:
            check_reference_npz(self.reference_npz)
        if self.feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
            raise ConfigError(f"metrics.feature_extractor={self.feature_extractor!r} is not allowed; choose one of: "
                              f"{', '.join(FEATURE_EXTRACTORS_REGISTRY)}")
        for name, minimum in (("rfid_samples", 0), ("gfid_samples", 2), ("reference_samples", 0),
                              ("batch_size", 1), ("kid_subset_size", 2), ("kid_subsets", 1),
                              ("isc_splits", 1), ("num_threads", 0)):
            check_int(f"metrics.{name}", getattr(self, name), minimum)

    def stats_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else weights.cache_root() / "fid_stats"


# ----------------------------------------------------------------------------- images
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Project images, float (N, C, H, W) or (C, H, W) in [-1, 1] with C in {1, 3}, as the uint8
    (N, 3, H, W) CPU tensor torch-fidelity expects (grey replicated). Exact inverse of the data
    loader's ``u / 127.5 - 1``."""
    x = images.detach()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, C, H, W) with C in (1, 3), got {tuple(images.shape)}")
    u = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).cpu()
    return u.expand(-1, 3, -1, -1).contiguous() if u.shape[1] == 1 else u.contiguous()


def subset_indices(total: int, count: int) -> list[int]:
    """The first ``count`` indices (0 = all, in order) of ``wartok.data.subset_order``, so
    rfid_samples=N picks what data.heldout_subset=N would."""
    if count == 0 or count >= total:
        if count > total:
            raise ValueError(f"asked for {count} images, the split holds {total}")
        return list(range(total))
    return subset_order(total)[:count].tolist()


def dataset_uint8(dataset: Dataset, count: int = 0, num_workers: int = 0, batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, 3, H, W) images of a project data set ((image, label) items), subset by subset_indices;
    num_workers > 0 decodes them in worker processes (50k ImageNet JPEGs are minutes for one)."""
    subset = Subset(dataset, subset_indices(len(dataset), count))
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        worker_init_fn=ignore_stop_signals)
    return torch.cat([to_uint8(images) for images, _ in loader])


# ----------------------------------------------------------------------------- distances
def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FID between two Gaussians (mu (D,), sigma (D, D)), by torch-fidelity's implementation, in float64."""
    stats = [{"mu": np.asarray(m, dtype=np.float64), "sigma": np.asarray(s, dtype=np.float64)}
             for m, s in ((mu1, sigma1), (mu2, sigma2))]
    return float(fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID])


def kernel_distance(features1: np.ndarray, features2: np.ndarray, subset_size: int, subsets: int,
                    seed: int) -> tuple[float, float]:
    """torch-fidelity's KID (polynomial kernel, unbiased MMD^2): (mean, std) over random subsets."""
    out = kid_features_to_metric(torch.as_tensor(features1), torch.as_tensor(features2), kid_subsets=subsets,
                                 kid_subset_size=subset_size, rng_seed=seed, verbose=False)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


# ----------------------------------------------------------------------------- result entries
def _entry(value: Optional[float], n: int, n_ref: Optional[int], ex: Extractor, seed: int, reliable: bool, note: str,
           **extra) -> dict:
    if value is not None and not np.isfinite(value):
        value, reliable, note = None, False, f"non-finite value ({value}); {note}".rstrip("; ")
    return {"value": None if value is None else float(value), "n": int(n),
            "n_reference": None if n_ref is None else int(n_ref),
            "extractor": ex.name, "weights_sha256": ex.weights_sha256, "torch_fidelity": TORCH_FIDELITY_VERSION,
            "seed": int(seed), "reliable": bool(reliable), "note": note, **extra}


def feature_network(ex: Extractor) -> str:
    """Which network and layer produced the features, e.g. 'inception-v3-compat layer 2048, weights sha256 1f3a...'."""
    return f"{ex.name} layer {ex.fid_layer}, weights sha256 {ex.weights_sha256[:16]}"


def key_reference(key: ReferenceKey) -> str:
    """What an entry computed against real images of a run names as its reference."""
    return f"{key.split} split, {key.count} images ({key.dataset})"


def fid_entry_from_statistics(mu: np.ndarray, sigma: np.ndarray, n: int, ref_mu: np.ndarray, ref_sigma: np.ndarray,
                              n_ref: Optional[int], ex: Extractor, seed: int, reference: str) -> dict:
    """The FID entry of samples with statistics (mu, sigma) from n images against a reference of
    n_ref images (None: unknown, a published .npz); the sharded and unsharded paths share it."""
    extra = {"reference": reference, "feature_network": feature_network(ex)}
    if n < 2 or (n_ref is not None and n_ref < 2):
        return _entry(None, n, n_ref, ex, seed, False, "FID needs at least 2 images on each side", **extra)
    if mu.shape != ref_mu.shape:
        raise ValueError(f"FID features are {mu.shape[0]}-d, the reference's {ref_mu.shape[0]}-d")
    reliable = min(n, n_ref if n_ref is not None else n) >= MIN_FID_SAMPLES
    note = "" if reliable else f"unreliable: FID on fewer than {MIN_FID_SAMPLES} images is biased high"
    return _entry(frechet_distance(mu, sigma, ref_mu, ref_sigma), n, n_ref, ex, seed, reliable, note, **extra)


def _fid_entry(features: torch.Tensor, ref: Reference, ex: Extractor, seed: int, reference: str) -> dict:
    n = len(features)
    mu, sigma = feature_statistics(features) if n >= 2 else (ref.mu, ref.sigma)
    return fid_entry_from_statistics(mu, sigma, n, ref.mu, ref.sigma, ref.n, ex, seed, reference)


def _kid_entry(features: torch.Tensor, ref: Reference, ex: Extractor, cfg: MetricsConfig, seed: int) -> dict:
    n, n_ref = len(features), len(ref.kid_features)
    subset = min(cfg.kid_subset_size, n, n_ref)
    if subset < 2:
        return _entry(None, n, n_ref, ex, seed, False, "KID needs at least 2 images on each side")
    mean, std = kernel_distance(features.numpy(), ref.kid_features, subset, cfg.kid_subsets, seed)
    reliable = subset == cfg.kid_subset_size
    note = "" if reliable else f"subset size clamped from {cfg.kid_subset_size} to {subset} (too few images)"
    return _entry(mean, n, n_ref, ex, seed, reliable, note, std=std, subset_size=subset, subsets=cfg.kid_subsets)


def _isc_entry(feats: dict[str, torch.Tensor], n: int, ex: Extractor, cfg: MetricsConfig, seed: int) -> dict:
    reason = ex.isc_unavailable or (None if cfg.isc else "disabled (metrics.isc=false)")
    if reason is None and ex.isc_layer not in feats:
        reason = "no logits were extracted"
    if reason is not None:
        return _entry(None, n, 0, ex, seed, False, reason, reason=reason)
    splits = min(cfg.isc_splits, n)
    out = isc_features_to_metric(feats[ex.isc_layer], splits=splits, shuffle=True, rng_seed=seed)
    reliable = n >= MIN_FID_SAMPLES  # the project's one small-sample rule, applied to IS as well
    return _entry(out[KEY_METRIC_ISC_MEAN], n, 0, ex, seed, reliable,
                  "" if reliable else f"unreliable: fewer than {MIN_FID_SAMPLES} samples",
                  std=out[KEY_METRIC_ISC_STD], splits=splits)


def reconstruction_metrics(recon: torch.Tensor, real: ImagesOrLoader, cfg: MetricsConfig, seed: int,
                           device: torch.device, reference_key: ReferenceKey) -> dict[str, dict]:
    """{"rfid", "rkid"}: reconstructions (uint8 (N, 3, H, W)) against the held-out images they
    reconstruct, whose statistics are cached under ``reference_key``."""
    if len(recon) != reference_key.count:
        raise ValueError(f"{len(recon)} reconstructions for a reference of {reference_key.count} images")
    ex = load_extractor(cfg, device)
    ref = reference_statistics(reference_key, real, cfg, device, ex)
    feats = extract_features(recon, ex, cfg)
    return {"rfid": _fid_entry(feats[ex.fid_layer], ref, ex, seed, key_reference(reference_key)),
            "rkid": _kid_entry(feats[ex.kid_layer], ref, ex, cfg, seed)}


def generation_metrics(samples: torch.Tensor, reference: ImagesOrLoader, cfg: MetricsConfig, seed: int,
                       device: torch.device, reference_key: ReferenceKey) -> dict[str, dict]:
    """{"gfid", "gkid", "is"}: samples (uint8 (N, 3, H, W)) against training images (cached under
    ``reference_key``; pass a function to load them only on a cache miss), or, with
    ``cfg.reference_npz``, against that published reference (the training images are not loaded)."""
    ex = load_extractor(cfg, device, isc=cfg.isc)  # its FID/KID features, and so the cache key, are the same
    feats = extract_features(samples, ex, cfg)
    return generation_entries(feats, len(samples), gfid_reference(reference, cfg, device, reference_key, ex),
                              ex, cfg, seed)


@dataclass
class GenerationReference:
    """What gFID/gKID compare against: FID statistics, KID feature rows (or why there are none)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: Optional[int]                      # images behind mu/sigma; None: unknown (a published .npz)
    kid_features: Optional[np.ndarray]    # None: no KID (kid_unavailable says why)
    kid_unavailable: Optional[str]
    name: str                             # the entries' "reference"


def gfid_reference(reference: ImagesOrLoader, cfg: MetricsConfig, device: torch.device, reference_key: ReferenceKey,
                   ex: Extractor) -> GenerationReference:
    """The training images' cached statistics, or the .npz of ``cfg.reference_npz``."""
    if cfg.reference_npz is None:
        ref = reference_statistics(reference_key, reference, cfg, device, ex)
        return GenerationReference(ref.mu, ref.sigma, ref.n, ref.kid_features, None, key_reference(reference_key))
    npz = load_reference_npz(cfg.reference_npz)
    name = f"adm_npz:{npz.sha256}"
    if not npz.has_images:
        return GenerationReference(npz.mu, npz.sigma, None, None,
                                   f"unavailable: {Path(npz.path).name} holds no arr_0 reference images", name)
    shape = npz_image_shape(npz)
    key = npz_kid_key(npz, shape[0], shape[1])
    kid = reference_statistics(key, lambda: npz_reference_images(npz), cfg, device, ex).kid_features
    return GenerationReference(npz.mu, npz.sigma, None, kid, None, name)


def generation_entries(feats: dict[str, torch.Tensor], n: int, ref: GenerationReference, ex: Extractor,
                       cfg: MetricsConfig, seed: int, fid_stats: Optional[tuple[np.ndarray, np.ndarray]] = None
                       ) -> dict[str, dict]:
    """The gfid/gkid/is entries from the samples' features; ``fid_stats`` (mu, sigma) replaces the
    FID layer's rows (a merged sharded computation keeps statistics, not rows)."""
    if ref.mu.shape[0] != (fid_stats[0].shape[0] if fid_stats else feats[ex.fid_layer].shape[1]):
        raise ConfigError(f"metrics.reference_npz={cfg.reference_npz} is not allowed; its statistics are "
                          f"{ref.mu.shape[0]}-d, the extractor {ex.name}'s features are not")
    if fid_stats is None:
        fid_stats = feature_statistics(feats[ex.fid_layer]) if n >= 2 else (ref.mu, ref.sigma)
    out = {"gfid": fid_entry_from_statistics(*fid_stats, n, ref.mu, ref.sigma, ref.n, ex, seed, ref.name)}
    if ref.kid_features is None:
        out["gkid"] = _entry(None, n, 0, ex, seed, False, ref.kid_unavailable, reason=ref.kid_unavailable,
                             reference=ref.name)
    else:
        kid_ref = Reference(ref.mu, ref.sigma, ref.kid_features, ref.n or len(ref.kid_features), "")
        out["gkid"] = {**_kid_entry(feats[ex.kid_layer], kid_ref, ex, cfg, seed), "reference": ref.name}
    out["is"] = _isc_entry(feats, n, ex, cfg, seed)
    return out


# ----------------------------------------------------------------------------- benchmark
def extraction_rate(device: torch.device, n: int = 64, batch_size: int = 32, image_size: int = 32,
                    cfg: Optional[MetricsConfig] = None) -> float:
    """Images/s of feature extraction (the configured extractor, after one warm-up batch) on random
    uint8 images of the project's size; loading the extractor is not timed."""
    cfg = dataclasses.replace(cfg or MetricsConfig(), batch_size=batch_size)
    ex = load_extractor(cfg, torch.device(device))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    extract_features(images[:min(batch_size, n)], ex, cfg)  # warm-up (cuDNN autotuning, oneDNN primitives)
    start = time.perf_counter()
    extract_features(images, ex, cfg)  # ends with a copy to the CPU, so no separate CUDA synchronize
    return n / (time.perf_counter() - start)
