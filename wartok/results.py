"""One tidy, machine-readable result per run, and the per-step scalars beside it.

`result.json` is the only file analysis reads. It is written atomically (temp file, fsync,
rename) so a killed job never leaves a half-written result; its schema is `RESULT_SCHEMA`,
checked by `validate_result`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import IO, Any, Iterator, Optional

SCHEMA_VERSION = 1
STATUSES = ("completed", "failed", "interrupted")
# Top-level keys and their JSON types; `metrics` maps a name to {"value", "n", ...}.
RESULT_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "schema_version": int,
    "run_id": str,
    "status": str,
    "error": (str, type(None)),
    "method": str,
    "seed": int,
    "git_commit": (str, type(None)),
    "git_dirty": (bool, type(None)),
    "started_utc": str,
    "ended_utc": str,
    "wall_seconds": float,
    "versions": dict,
    "config": dict,
    "overrides": list,
    "metrics": dict,
    "artifacts": dict,
}
PACKAGES = ("wartok", "torch", "torchvision", "torch-fidelity", "hydra-core", "optuna", "numpy")


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "w", perms: Optional[int] = None) -> Iterator[IO]:
    """A handle on a hidden temp file beside `path`; when the block ends it is fsynced and renamed
    over `path`, so readers see the old file or the new one, never half. On any error (a full
    disk, a kill signal turned exception) the temp file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if perms is not None:
            os.fchmod(fd, perms)
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_writer(path) as handle:
        handle.write(text)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_state(folder: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout holding this package; (None, None) outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit.stdout.strip(), bool(status.stdout.strip())


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: one column per setting for the analysis table."""
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: tree}


def metric(value: float, n: int, **extra: Any) -> dict[str, Any]:
    """A metric entry: its value, the sample count behind it, and anything else that qualifies it."""
    if not math.isfinite(value):
        raise ValueError(f"refusing to record a non-finite metric value {value!r}")
    return {"value": float(value), "n": int(n), **extra}


def write_result(path: Path, result: dict[str, Any]) -> None:
    validate_result(result)
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True) + "\n")


def validate_result(result: dict[str, Any]) -> None:
    """Raise ValueError naming the first key that breaks the schema."""
    for key, kind in RESULT_SCHEMA.items():
        if key not in result:
            raise ValueError(f"result is missing key {key!r}")
        if not isinstance(result[key], kind):
            raise ValueError(f"result[{key!r}] has type {type(result[key]).__name__}, expected {kind}")
    if result["status"] not in STATUSES:
        raise ValueError(f"result['status']={result['status']!r} is not one of {STATUSES}")
    for name, entry in result["metrics"].items():
        if not isinstance(entry, dict) or "value" not in entry or "n" not in entry:
            raise ValueError(f"metric {name!r} must be a dict with 'value' and 'n'")
        value = entry["value"]
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value)):
            raise ValueError(f"metric {name!r} has a non-finite value {value!r}")


def read_result(path: Path) -> dict[str, Any]:
    result = json.loads(Path(path).read_text())
    validate_result(result)
    return result


class ScalarLog:
    """Appends one JSON line per logged step to scalars.jsonl (flushed, so a killed run keeps its curve).

    path=None: a log that writes nothing, for the ranks other than 0 of a data-parallel run."""

    def __init__(self, path: Optional[Path], truncate_to: Optional[int] = None) -> None:
        """Append to `path`; truncate_to drops what a resumed run logged after its checkpoint."""
        self.handle = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_to is not None and path.is_file():
            os.truncate(path, truncate_to)
        self.handle = open(path, "a", buffering=1)

    def offset(self) -> int:
        """The byte length of the log so far (a checkpoint stores it)."""
        if self.handle is None:
            return 0
        self.handle.flush()
        return self.handle.tell()

    def log(self, stage: str, step: int, scalars: dict[str, float]) -> None:
        if self.handle is not None:
            self.handle.write(json.dumps({"stage": stage, "step": step, **scalars}) + "\n")

    def extend(self, path: Path) -> None:
        """Append the lines of another scalars file (a cached stage's curves) to this one."""
        if self.handle is not None and path.is_file():
            self.handle.write(path.read_text())

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()

    def __enter__(self) -> "ScalarLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
