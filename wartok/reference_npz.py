"""Published FID references: ADM-evaluator-style ``.npz`` files (``mu``, ``sigma``, optional ``arr_0``).

The ADM evaluator's reference batches (``VIRTUAL_imagenet256_labeled.npz`` ...) hold the mean
``mu`` (D,) and covariance ``sigma`` (D, D) of the TF-Inception pool features of a whole data
set, and ``arr_0``, reference images (N, H, W, 3) uint8, for the other metrics. Files are read
with ``allow_pickle=False``; a wrong file is refused with one ConfigError line, checked from the
arrays' headers only (cheap enough for config validation). A file is named by its sha256, which
the FID entries record. Imports from wartok: ``validate``, ``weights`` (its sha256).
"""
from __future__ import annotations

import functools
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wartok.validate import ConfigError
from wartok.weights import sha256_file


def _npz_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one array of an .npz from its .npy header, without reading the data."""
    with zf.open(f"{member}.npy") as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        if version not in readers:
            raise ValueError(f"{member}.npy has .npy format version {version}")
        shape, _, dtype = readers[version](f)
    return shape, dtype


def check_reference_npz(path: str, name: str = "metrics.reference_npz") -> int:
    """The feature dimension D of an ADM-style reference .npz (mu (D,), sigma (D, D), optional
    arr_0 (N, H, W, 3) uint8); a wrong or unreadable file raises one ConfigError line. Reads
    only the arrays' headers, so it is cheap enough for config validation."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"{name}={path} does not exist; give an ADM-evaluator-style .npz holding mu and sigma")
    expected = "an ADM-evaluator-style .npz with float arrays mu (D,) and sigma (D, D)"
    try:
        with zipfile.ZipFile(file) as zf:
            members = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            if not {"mu", "sigma"} <= members:
                raise ConfigError(f"{name}={path} is not allowed; it holds {sorted(members)}, expected {expected}")
            (mu_shape, mu_dtype), (sigma_shape, sigma_dtype) = _npz_header(zf, "mu"), _npz_header(zf, "sigma")
            images = _npz_header(zf, "arr_0") if "arr_0" in members else None
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ConfigError(f"{name}={path} is not allowed; it is not a readable .npz ({err}); expected {expected}") from None
    ok = (len(mu_shape) == 1 and sigma_shape == (mu_shape[0], mu_shape[0]) and mu_dtype.kind == "f"
          and sigma_dtype.kind == "f")
    if not ok:
        raise ConfigError(f"{name}={path} is not allowed; it holds mu {mu_shape} {mu_dtype} and sigma "
                          f"{sigma_shape} {sigma_dtype}, expected {expected}")
    if images is not None and (len(images[0]) != 4 or images[0][-1] != 3 or images[1] != np.uint8):
        raise ConfigError(f"{name}={path} is not allowed; its arr_0 is {images[0]} {images[1]}, expected "
                          "reference images (N, H, W, 3) uint8")
    return int(mu_shape[0])


@dataclass
class NpzReference:
    """An ADM-evaluator-style reference: FID statistics of a fixed image set, maybe its images."""

    mu: np.ndarray                 # (D,) float64
    sigma: np.ndarray              # (D, D) float64
    sha256: str                    # of the file: what the FID entries name as their reference
    path: str
    has_images: bool               # arr_0 present: KID against those reference images


@functools.lru_cache(maxsize=2)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of the file, recomputed only when its size or mtime changes (the key)."""
    return sha256_file(path)


def load_reference_npz(path: str) -> NpzReference:
    """mu and sigma (float64) of an ADM-style .npz (allow_pickle=False); ConfigError on a wrong file.
    Whether D matches the extractor's features is checked where both are known (metrics.generation_entries)."""
    check_reference_npz(path)
    file = Path(path).expanduser().resolve()
    with np.load(file, allow_pickle=False) as z:
        mu, sigma, has_images = z["mu"].astype(np.float64), z["sigma"].astype(np.float64), "arr_0" in z.files
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ConfigError(f"metrics.reference_npz={path} is not allowed; its mu or sigma holds non-finite values")
    stat = file.stat()
    return NpzReference(mu=mu, sigma=sigma, sha256=_file_sha256(str(file), stat.st_size, stat.st_mtime_ns),
                        path=str(file), has_images=has_images)


def npz_reference_images(ref: NpzReference) -> torch.Tensor:
    """The .npz's arr_0 reference images (N, H, W, 3) uint8 as torch-fidelity's (N, 3, H, W)."""
    with np.load(ref.path, allow_pickle=False) as z:
        return torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2).contiguous()


def npz_image_shape(ref: NpzReference) -> tuple[int, ...]:
    with zipfile.ZipFile(ref.path) as zf:
        return _npz_header(zf, "arr_0")[0]
