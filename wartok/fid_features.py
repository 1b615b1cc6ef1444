"""Image features for FID/KID/IS: torch-fidelity's extractor, built once per process, run offline.

``load_extractor`` resolves the weights through ``wartok.weights`` (a local file first; see
its lookup order) and forces every torch.load inside torch-fidelity to weights_only=True; on the CPU it
folds BatchNorm into the convolutions and goes channels_last (1.6x here). ``extract_features``
feeds uint8 tensors straight to torch-fidelity's batched loop (no temporary PNG folders) in full
fp32, whatever precision the run trains in. The metrics built on these features are in
``wartok/metrics.py``.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
from torch.utils.data import Dataset
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from wartok import weights

if TYPE_CHECKING:  # annotations only: metrics imports this module
    from wartok.metrics import MetricsConfig

INCEPTION = "inception-v3-compat"


class UInt8Images(Dataset):
    """uint8 (N, 3, H, W) images in memory, one (3, H, W) tensor per item, for torch-fidelity's loader."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        self.images = images.cpu()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


@dataclass
class Extractor:
    """A torch-fidelity feature extractor ready to run, and what identifies its features."""

    name: str
    module: torch.nn.Module
    fid_layer: str
    kid_layer: str
    isc_layer: Optional[str]          # None when IS is unavailable (then isc_unavailable says why)
    isc_unavailable: Optional[str]
    weights_sha256: str
    device: torch.device


def _state_sha256(module: torch.nn.Module) -> str:
    """Checksum of an extractor's tensors, for extractors that take no weights file."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _speed_up_on_cpu(module: torch.nn.Module) -> torch.nn.Module:
    """Fold each eval-mode BatchNorm into its conv, and go channels_last (oneDNN's fast layout):
    1.6x on the project's 2-core CPU; features agree with the plain module to ~1e-5 (slow test)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for block in module.modules():
        if isinstance(getattr(block, "bn", None), torch.nn.BatchNorm2d) and isinstance(getattr(block, "conv", None),
                                                                                     torch.nn.Conv2d):
            block.conv = fuse_conv_bn_eval(block.conv, block.bn)
            block.bn = torch.nn.Identity()
    return module.to(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=2)
def _build_module(name: str, layers: tuple[str, ...], weights_path: Optional[str], weights_sha: Optional[str],
                  device: str, fast_cpu: bool) -> torch.nn.Module:
    """One torch-fidelity extractor per argument set (the checksum keys a rebuilt file apart)."""
    kwargs = {"feature_extractor_weights_path": weights_path} if weights_path else {}
    dev = torch.device(device)
    with weights.force_weights_only_load(), (torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()):
        module = create_feature_extractor(name, list(layers), cuda=dev.type == "cuda", verbose=False, **kwargs)
    return _speed_up_on_cpu(module) if fast_cpu and dev.type == "cpu" else module


def _default_layer(cls: type, metric: str) -> Optional[str]:
    try:
        return cls.get_default_feature_layer_for_metric(metric)
    except (KeyError, NotImplementedError):
        return None


def load_extractor(cfg: MetricsConfig, device: torch.device, isc: bool = False, fast_cpu: bool = True) -> Extractor:
    """The configured extractor on ``device`` (built once per process); weights are resolved by
    ``wartok.weights`` and every torch.load inside torch-fidelity is forced to weights_only=True.
    ``isc`` adds the logits layer when there is a usable one."""
    cls = FEATURE_EXTRACTORS_REGISTRY[cfg.feature_extractor]
    fid_layer, kid_layer, isc_layer = (_default_layer(cls, m) for m in ("fid", "kid", "isc"))
    path, sha = None, None
    reason = None if isc_layer else f"unavailable: extractor {cfg.feature_extractor} has no logits layer"
    if cfg.feature_extractor == INCEPTION:
        path, sha = weights.resolve_inception_weights(cfg.inception_weights)
        reason = weights.weights_info(path).isc_unavailable
    layers = tuple(dict.fromkeys([fid_layer, kid_layer] + ([isc_layer] if isc and reason is None else [])))
    device = torch.device(device)
    module = _build_module(cfg.feature_extractor, layers, path, sha, str(device), fast_cpu)
    return Extractor(name=cfg.feature_extractor, module=module, fid_layer=fid_layer, kid_layer=kid_layer,
                     isc_layer=isc_layer if reason is None else None, isc_unavailable=reason,
                     weights_sha256=sha or _state_sha256(module), device=device)


@contextlib.contextmanager
def _extraction_settings(cfg: MetricsConfig, device: torch.device):
    """Full fp32 (TF32 off, whatever the run set), the configured CPU threads, the right GPU."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        if cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def extract_features(images: torch.Tensor, ex: Extractor, cfg: MetricsConfig) -> dict[str, torch.Tensor]:
    """{layer: float32 (N, D) CPU features} for uint8 (N, 3, H, W) images, in batches of cfg.batch_size."""
    dataset = UInt8Images(images)
    with _extraction_settings(cfg, ex.device):
        feats = get_featuresdict_from_dataset(dataset, ex.module, cfg.batch_size, ex.device.type == "cuda",
                                              save_cpu_ram=True, verbose=False)  # save_cpu_ram: no worker processes
    return {k: v.float().cpu() for k, v in feats.items()}
