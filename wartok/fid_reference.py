"""Cached statistics of real images: FID's (mu, sigma) and KID's feature rows, extracted once.

A reference is stored as ``.npz`` (read with ``allow_pickle=False``) under a content key: data
set, split, image size, channels, count, extractor, weights sha256, the image-selection seed and
the cache format. A file that does not load or does not match its key is rebuilt with a warning,
never trusted; writes are atomic, so an interrupted run leaves no half-written reference.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics

from wartok.data import SUBSET_SEED
from wartok.fid_features import Extractor, extract_features, load_extractor
from wartok.reference_npz import NpzReference
from wartok.results import atomic_writer

if TYPE_CHECKING:  # annotations only: metrics imports this module
    from wartok.metrics import MetricsConfig

KID_REFERENCE_MAX = 10000    # reference feature rows kept for KID (10k x 2048 float32 = 82 MB)
CACHE_FORMAT = 1             # bump when the cached arrays change meaning
ImagesOrLoader = Union[torch.Tensor, Callable[[], torch.Tensor]]


def feature_statistics(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu (D,), sigma (D, D)) of features (N, D), by torch-fidelity."""
    stats = fid_features_to_statistics(features.float().cpu())
    return stats["mu"], stats["sigma"]


@dataclass(frozen=True)
class ReferenceKey:
    """What real images a reference was computed from (with the extractor, the cache key)."""

    dataset: str      # e.g. data.name
    split: str        # "train" | "heldout"
    image_size: int
    count: int        # number of images actually used
    channels: int = 3
    source: str = ""  # whatever else selects the images: the folder of an imagefolder set, a data-level subset


@dataclass
class Reference:
    mu: np.ndarray            # (D,)
    sigma: np.ndarray         # (D, D)
    kid_features: np.ndarray  # (min(n, KID_REFERENCE_MAX), D) float32
    n: int
    identity: str             # the JSON the cache key hashes


def _identity(key: ReferenceKey, ex: Extractor) -> str:
    return json.dumps({**asdict(key), "extractor": ex.name, "weights_sha256": ex.weights_sha256,
                       "fid_layer": ex.fid_layer, "kid_layer": ex.kid_layer, "kid_max": KID_REFERENCE_MAX,
                       "selection_seed": SUBSET_SEED, "format": CACHE_FORMAT}, sort_keys=True)


def reference_path(key: ReferenceKey, ex: Extractor, cfg: MetricsConfig) -> Path:
    """``<dataset>-<split>-<size>px-n<count>-<extractor>-<hash of the full identity>.npz`` in the stats dir."""
    digest = hashlib.sha256(_identity(key, ex).encode()).hexdigest()[:16]
    name = f"{key.dataset}-{key.split}-{key.image_size}px-n{key.count}-{ex.name}"
    return cfg.stats_dir() / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}-{digest}.npz"


def _load_reference(path: Path, identity: str) -> Optional[Reference]:
    """The cached reference, or None when absent; a broken or mismatched file warns and returns None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            ref = Reference(mu=z["mu"], sigma=z["sigma"], kid_features=z["kid_features"], n=int(z["n"]),
                            identity=str(z["identity"]))
        d = ref.mu.shape[0]
        if ref.identity != identity or ref.sigma.shape != (d, d) or ref.kid_features.shape[1:] != (d,):
            raise ValueError("contents do not match the cache key")
        if not (np.isfinite(ref.mu).all() and np.isfinite(ref.sigma).all()):
            raise ValueError("non-finite statistics")
        return ref
    except Exception as e:  # a cache must never crash a run: anything unreadable is rebuilt
        warnings.warn(f"wartok.fid_reference: reference statistics {path} are unreadable ({type(e).__name__}: {e}); "
                      "rebuilding them", RuntimeWarning, stacklevel=3)
        return None


def _save_reference(path: Path, ref: Reference) -> None:
    """Atomically: a temp file in the same folder, fsync, rename."""
    with atomic_writer(path, "wb") as f:
        np.savez(f, mu=ref.mu, sigma=ref.sigma, kid_features=ref.kid_features, n=np.int64(ref.n),
                 identity=np.str_(ref.identity))


def reference_statistics(key: ReferenceKey, images: ImagesOrLoader, cfg: MetricsConfig, device: torch.device,
                         ex: Optional[Extractor] = None) -> Reference:
    """Statistics of real images, extracted once per key and then read from the cache. ``images``
    (uint8 (N, 3, H, W), N = key.count) may be a zero-argument function, called only on a miss."""
    ex = ex or load_extractor(cfg, device)
    path, identity = reference_path(key, ex, cfg), _identity(key, ex)
    ref = _load_reference(path, identity)
    if ref is not None:
        return ref
    images = images() if callable(images) else images
    if len(images) != key.count:
        raise ValueError(f"reference key says {key.count} images, got {len(images)}")
    feats = extract_features(images, ex, cfg)
    mu, sigma = feature_statistics(feats[ex.fid_layer])
    ref = Reference(mu=mu, sigma=sigma, kid_features=feats[ex.kid_layer][:KID_REFERENCE_MAX].numpy(),
                    n=len(images), identity=identity)
    _save_reference(path, ref)
    return ref


def npz_kid_key(ref: NpzReference, count: int, image_size: int) -> ReferenceKey:
    """The reference-cache key of an .npz's images (their KID features are extracted once)."""
    return ReferenceKey("adm_npz", ref.sha256[:16], image_size, count, 3, f"adm_npz:{ref.sha256}")
