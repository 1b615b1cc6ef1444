"""Image data sets and loaders: Fashion-MNIST, CIFAR-10 and ImageFolder trees (ImageNet layout).

Every item is ``(image, label)`` with ``image`` a float32 tensor (C, H, W) in [-1, 1].
``build_data`` first resolves where the data lives and fails with one ``ConfigError`` line
(the setting, the paths tried, how to get the data) before any loading work.

Offline Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` puts the original idx
``.gz`` files in ``DEBIAN_FASHION_MNIST``; they are gunzipped once into the cache
(``$WARTOK_CACHE`` or ``~/.cache/wartok``) in torchvision's layout and read from there.

CLI: ``python -m wartok.data fetch fashion_mnist [--root DIR]`` and ``... info NAME``.
"""
from __future__ import annotations

import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import transforms

from wartok.dist import per_rank_batch
from wartok.runtime import ignore_stop_signals
from wartok.stream import EpochSampler, shard
from wartok.validate import ConfigError, check_choice, check_int

NAMES = ("fashion_mnist", "cifar10", "imagefolder", "imagenet")
DOWNLOADABLE = ("fashion_mnist", "cifar10")
# Where `apt-get install dataset-fashion-mnist` puts the idx files; tests monkeypatch it.
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FASHION_MNIST_HOWTO = ("apt-get install dataset-fashion-mnist (Debian), data.download=true (online), "
                       "or python -m wartok.data fetch fashion_mnist")
# Subsets come from a permutation with a fixed seed so they do not change with the run seed.
SUBSET_SEED = 20240601


@dataclass
class DataConfig:
    name: str = "fashion_mnist"   # fashion_mnist | cifar10 | imagefolder | imagenet (ImageFolder train/ + val/)
    root: Optional[str] = None    # None: the default search (fashion_mnist) or the cache (download)
    image_size: int = 32          # fashion_mnist: 28x28 padded with -1 (>= 28); cifar10: 32; imagefolder: resize + centre crop
    channels: int = 3             # 3 or 1; grey is replicated to 3 channels, colour is converted to luminance
    download: bool = False        # let torchvision download (fashion_mnist, cifar10); never in tests
    batch_size: int = 64          # training batch (drop_last, so the train split must hold one)
    eval_batch_size: int = 256
    num_workers: int = 0
    train_subset: int = 0         # 0 = the whole split; else the first N of a fixed permutation
    heldout_subset: int = 0

    def __post_init__(self):
        check_choice("data.name", self.name, NAMES)
        if self.root is not None and (not isinstance(self.root, str) or not self.root):
            raise ConfigError(f"data.root={self.root!r} is not allowed; it must be a folder path or null")
        check_int("data.image_size", self.image_size, 1)
        if self.name == "fashion_mnist" and self.image_size < 28:
            raise ConfigError(f"data.image_size={self.image_size} is not allowed for data.name=fashion_mnist; "
                              "it must be >= 28 (28x28 images are padded, never shrunk)")
        if self.name == "cifar10" and self.image_size != 32:
            raise ConfigError(f"data.image_size={self.image_size} is not allowed for data.name=cifar10; it must be 32")
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise ConfigError(f"data.channels={self.channels!r} is not allowed; choose one of: 1, 3")
        if not isinstance(self.download, bool):
            raise ConfigError(f"data.download={self.download!r} is not allowed; it must be true or false")
        if self.download and self.name not in DOWNLOADABLE:
            raise ConfigError(f"data.download=true is not allowed for data.name={self.name}; "
                              f"only for: {', '.join(DOWNLOADABLE)}")
        check_int("data.batch_size", self.batch_size, 1)
        check_int("data.eval_batch_size", self.eval_batch_size, 1)
        check_int("data.num_workers", self.num_workers, 0)
        check_int("data.train_subset", self.train_subset, 0)
        check_int("data.heldout_subset", self.heldout_subset, 0)


@dataclass
class DataBundle:
    train: Dataset
    heldout: Dataset
    train_loader: DataLoader
    heldout_loader: DataLoader
    num_classes: int
    image_size: int
    channels: int
    source: str                   # the folder the data was read from (for the run's result)


@dataclass(frozen=True)
class _Source:
    """Where a data set will be read from, decided before any loading work."""
    folder: str                   # reported as DataBundle.source
    tv_root: str                  # the root handed to torchvision
    gz_dir: Optional[str] = None  # idx .gz files to gunzip into tv_root first (Debian package)
    download: bool = False


# ----------------------------------------------------------------------------- locating

def cache_dir() -> str:
    """Folder for derived data sets; ``$WARTOK_CACHE`` keeps tests and clusters off ``~``."""
    base = os.environ.get("WARTOK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "wartok")
    return os.path.join(os.path.abspath(base), "datasets")


def _has_files(folder: str, names, suffix: str = "") -> bool:
    return all(os.path.isfile(os.path.join(folder, n + suffix)) for n in names)


def _existing_root(cfg: DataConfig) -> Optional[str]:
    if cfg.root is None:
        return None
    root = os.path.abspath(os.path.expanduser(cfg.root))
    if not os.path.isdir(root):
        raise ConfigError(f"data.root={cfg.root} does not exist (looked for the folder {root})")
    return root


def _locate_fashion_mnist(cfg: DataConfig) -> _Source:
    root = _existing_root(cfg)
    tried = []
    if root is not None:
        raw = os.path.join(root, "FashionMNIST", "raw")
        if _has_files(raw, FASHION_MNIST_FILES):
            return _Source(raw, root)
        tried.append(raw)
    cache = cache_dir()
    cache_raw = os.path.join(cache, "FashionMNIST", "raw")
    if _has_files(DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES, ".gz"):
        return _Source(DEBIAN_FASHION_MNIST, cache, gz_dir=DEBIAN_FASHION_MNIST)
    tried.append(DEBIAN_FASHION_MNIST)
    if _has_files(cache_raw, FASHION_MNIST_FILES):  # e.g. an earlier download into the cache
        return _Source(cache_raw, cache)
    tried.append(cache_raw)
    if cfg.download:
        target = root or cache
        return _Source(os.path.join(target, "FashionMNIST", "raw"), target, download=True)
    raise ConfigError(f"data.name=fashion_mnist: data not found (tried {', '.join(tried)}); "
                      f"get it with: {FASHION_MNIST_HOWTO}")


def _locate_cifar10(cfg: DataConfig) -> _Source:
    root = _existing_root(cfg)
    if root is None and not cfg.download:
        raise ConfigError("data.root is required for data.name=cifar10 (a folder holding cifar-10-batches-py), "
                          "or set data.download=true")
    target = root or cache_dir()
    batches = os.path.join(target, "cifar-10-batches-py")
    if os.path.isdir(batches):
        return _Source(batches, target)
    if cfg.download:
        return _Source(batches, target, download=True)
    raise ConfigError(f"data.root={cfg.root}: CIFAR-10 not found at {batches}; "
                      "data.download=true or download CIFAR-10 python version into ROOT/cifar-10-batches-py")


def _locate_imagefolder(cfg: DataConfig) -> _Source:
    root = _existing_root(cfg)
    if root is None:
        raise ConfigError(f"data.root is required for data.name={cfg.name} (a folder with train/ and val/, "
                          "each holding one subfolder per class)")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise ConfigError(f"data.root={cfg.root} has no {split}/ folder (tried {os.path.join(root, split)}); "
                              f"data.name={cfg.name} needs ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg")
    return _Source(root, root)


def locate(cfg: DataConfig) -> _Source:
    """Resolve and check where ``cfg``'s data lives; raises ConfigError, loads nothing."""
    if cfg.name == "fashion_mnist":
        return _locate_fashion_mnist(cfg)
    if cfg.name == "cifar10":
        return _locate_cifar10(cfg)
    return _locate_imagefolder(cfg)


# ----------------------------------------------------------------------------- loading

def _gunzip_once(gz_dir: str, raw_dir: str) -> None:
    """Gunzip the idx files into torchvision's raw folder; temp file + os.replace, so a crash
    or a concurrent run never leaves a half-written file that would look complete."""
    os.makedirs(raw_dir, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        dest = os.path.join(raw_dir, name)
        if os.path.isfile(dest):
            continue
        fd, tmp = tempfile.mkstemp(dir=raw_dir, prefix=f".{name}.")
        try:
            with gzip.open(os.path.join(gz_dir, name + ".gz"), "rb") as src, os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            os.replace(tmp, dest)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


_LUMA = torch.tensor([0.299, 0.587, 0.114])


class TensorImages(Dataset):
    """uint8 images (N, C, H, W) held in memory, converted per item: float [-1, 1], channel
    count, and padding with -1 (the background) to ``size``. Doing this on tensors avoids
    torchvision's per-item PIL round trip and keeps the whole split at 1 byte per pixel."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int, channels: int):
        assert images.dtype == torch.uint8 and images.dim() == 4, images.shape
        self.images, self.labels = images, labels.long()
        self.size, self.channels = size, channels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.images[i].float() / 127.5 - 1.0  # (C, H, W), exactly 0 -> -1 and 255 -> 1
        if x.shape[0] != self.channels:
            if self.channels == 3:
                x = x.expand(3, -1, -1)
            else:  # ITU-R 601-2 luma, as PIL's convert("L"); clamp float rounding back into [-1, 1]
                x = (_LUMA.view(3, 1, 1) * x).sum(0, keepdim=True).clamp_(-1.0, 1.0)
        pad_h, pad_w = self.size - x.shape[1], self.size - x.shape[2]
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=-1.0)
        return x.contiguous(), int(self.labels[i])


def _read_error(cfg: DataConfig, src: _Source, err: Exception) -> ConfigError:
    """torchvision's download or integrity failure, as one line saying what to do."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if src.download:
        hint = ("apt-get install dataset-fashion-mnist (Debian)" if cfg.name == "fashion_mnist"
                else "put the CIFAR-10 python version into ROOT/cifar-10-batches-py")
        return ConfigError(f"data.download=true: downloading {cfg.name} into {src.tv_root} failed ({first}); "
                           f"offline: {hint}")
    return ConfigError(f"data.name={cfg.name}: the files in {src.folder} are incomplete or corrupted ({first}); "
                       "remove them and fetch the data again")


def _load_fashion_mnist(cfg: DataConfig, src: _Source):
    if src.gz_dir is not None:
        _gunzip_once(src.gz_dir, os.path.join(src.tv_root, "FashionMNIST", "raw"))
    splits = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.FashionMNIST(src.tv_root, train=train, download=src.download)
        except (RuntimeError, OSError) as err:
            raise _read_error(cfg, src, err) from err
        splits.append(TensorImages(ds.data.unsqueeze(1), ds.targets, cfg.image_size, cfg.channels))
    return splits[0], splits[1], 10


def _load_cifar10(cfg: DataConfig, src: _Source):
    splits = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.CIFAR10(src.tv_root, train=train, download=src.download)
        except (RuntimeError, OSError) as err:
            raise _read_error(cfg, src, err) from err
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        splits.append(TensorImages(images, torch.tensor(ds.targets), cfg.image_size, cfg.channels))
    return splits[0], splits[1], 10


def _load_imagefolder(cfg: DataConfig, src: _Source):
    tf = [transforms.Resize(cfg.image_size), transforms.CenterCrop(cfg.image_size)]
    if cfg.channels == 1:
        tf.append(transforms.Grayscale(num_output_channels=1))
    tf += [transforms.ToTensor(), transforms.Normalize([0.5] * cfg.channels, [0.5] * cfg.channels)]
    splits = []
    for split in ("train", "val"):
        folder = os.path.join(src.tv_root, split)
        try:
            splits.append(torchvision.datasets.ImageFolder(folder, transform=transforms.Compose(tf)))
        except FileNotFoundError as err:
            raise ConfigError(f"data.root={cfg.root}: {folder} holds no class folders with images ({err}); "
                              "each split needs one subfolder per class") from err
    train, val = splits
    # ImageFolder numbers classes per split by sorted folder name: differing class sets would
    # silently give the same label to different classes.
    if train.classes != val.classes:
        raise ConfigError(f"data.root={cfg.root}: train/ and val/ have different class folders "
                          f"({len(train.classes)} vs {len(val.classes)}); labels would not match")
    return train, val, len(train.classes)


def subset_order(total: int) -> torch.Tensor:
    """The fixed permutation of range(total) that every subset of a split is a prefix of: the data
    subsets here and the metrics' image selections (rfid_samples=N picks what heldout_subset=N would)."""
    return torch.randperm(total, generator=torch.Generator().manual_seed(SUBSET_SEED))


def _subset(ds: Dataset, n: int, setting: str) -> Dataset:
    if n == 0:
        return ds
    if n > len(ds):
        raise ConfigError(f"{setting}={n} is not allowed; the split holds only {len(ds)} images")
    return Subset(ds, subset_order(len(ds))[:n].tolist())


def _loader(ds: Dataset, batch_size: int, cfg: DataConfig, device_type: str, train: bool, seed: int) -> DataLoader:
    # training order: one seeded permutation per epoch (wartok/stream.py), resumable mid-epoch
    sampler = EpochSampler(len(ds), seed) if train else None
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, drop_last=train,
                      num_workers=cfg.num_workers, pin_memory=device_type == "cuda",
                      persistent_workers=cfg.num_workers > 0, worker_init_fn=ignore_stop_signals)


def build_data(cfg: DataConfig, seed: int, device_type: str = "cpu", rank: int = 0, world: int = 1) -> DataBundle:
    """Data sets and loaders for ``cfg``. The train loader's sampler is an EpochSampler: iterate it
    through a wartok.stream.BatchStream, whose seed fixes the order (each stage passes its own).
    With world > 1 processes (wartok/dist.py) data.batch_size is the global batch and the train
    loader yields this rank's slice of it; the held-out loader is the whole split on every rank."""
    per_rank_batch("data.batch_size", cfg.batch_size, world)  # ConfigError unless divisible
    src = locate(cfg)
    load = {"fashion_mnist": _load_fashion_mnist, "cifar10": _load_cifar10}.get(cfg.name, _load_imagefolder)
    train, heldout, num_classes = load(cfg, src)
    train = _subset(train, cfg.train_subset, "data.train_subset")
    heldout = _subset(heldout, cfg.heldout_subset, "data.heldout_subset")
    if len(train) < cfg.batch_size:  # drop_last would leave an empty epoch
        raise ConfigError(f"data.batch_size={cfg.batch_size} is not allowed; the training set holds only "
                          f"{len(train)} images and incomplete batches are dropped")
    train_loader = _loader(train, cfg.batch_size, cfg, device_type, train=True, seed=seed)
    return DataBundle(
        train=train, heldout=heldout,
        train_loader=train_loader if world == 1 else shard(train_loader, rank, world),
        heldout_loader=_loader(heldout, cfg.eval_batch_size, cfg, device_type, train=False, seed=seed),
        num_classes=num_classes, image_size=cfg.image_size, channels=cfg.channels, source=src.folder)


# ----------------------------------------------------------------------------- CLI

def _fetch_fashion_mnist(root: Optional[str]) -> int:
    if root is not None:
        os.makedirs(root, exist_ok=True)  # a folder to download into, should it come to that
    cfg = DataConfig(root=root)
    try:
        print(f"Fashion-MNIST found: {locate(cfg).folder}")
        return 0
    except ConfigError as err:
        print(f"not found yet: {err}")
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "dataset-fashion-mnist"]):
            print("running:", " ".join(cmd), flush=True)
            if subprocess.run(cmd).returncode != 0:
                print(f"{' '.join(cmd)} failed", file=sys.stderr)
                break
        else:
            if _has_files(DEBIAN_FASHION_MNIST, FASHION_MNIST_FILES, ".gz"):
                print(f"Fashion-MNIST installed: {DEBIAN_FASHION_MNIST}")
                return 0
    else:
        print("apt-get is not available as root here; trying torchvision's download")
    cfg = DataConfig(root=root, download=True)
    src = locate(cfg)
    try:
        _load_fashion_mnist(cfg, src)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"Fashion-MNIST downloaded: {src.folder}")
    return 0


def _info(name: str, root: Optional[str]) -> int:
    try:
        bundle = build_data(DataConfig(name=name, root=root, batch_size=1), seed=0)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    x, _ = bundle.train[0]
    print(f"{name}: train {len(bundle.train)}, held-out {len(bundle.heldout)}, classes {bundle.num_classes}, "
          f"image {tuple(x.shape)}, source {bundle.source}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wartok.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="make a data set available offline (apt package or download)")
    fetch.add_argument("name", choices=["fashion_mnist"])
    fetch.add_argument("--root", default=None, help="torchvision root to look in / download into")
    info = sub.add_parser("info", help="print split sizes and where the data is read from")
    info.add_argument("name", choices=NAMES)
    info.add_argument("--root", default=None)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        return _fetch_fashion_mnist(args.root)
    return _info(args.name, args.root)


if __name__ == "__main__":
    sys.exit(main())
