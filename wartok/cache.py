"""Content-addressed cache of the shared stages A and B (METHOD.md: a sweep over stage-C
settings must reuse them, never retrain them per job).

An entry is a folder named by the sha256 of exactly the settings its stage depends on
(`stage_key`), holding the stage's files and a `meta.json` written last. Concurrency: one
`flock` per key serialises the jobs that ask for the same entry, so only the first trains it
and the others wait, then load it; the entry is built in a temp folder and renamed into place,
so no reader ever sees a half-written one. A corrupt entry (a file that no longer loads) is
moved aside with a warning and rebuilt. flock works across processes of one machine and on
most cluster file systems (Lustre, GPFS, NFSv4 with locking); point `cache_dir` at one.

In a data-parallel run (wartok/dist.py) every rank trains a missing entry, but only rank 0
takes the lock, writes and renames; the others call build(None) (write nothing), then load
rank 0's entry once it is in place.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

from wartok import dist
from wartok.checkpoint import CheckpointError
from wartok.results import atomic_write_text

# Bump when a change to the code makes old entries wrong (a different training loop or format).
CACHE_VERSION = 1
META = "meta.json"
T = TypeVar("T")


def default_cache_dir() -> Path:
    base = os.environ.get("WARTOK_CACHE") or Path.home() / ".cache" / "wartok"
    return Path(base).expanduser() / "stages"


def stage_key(stage: str, payload: dict[str, Any]) -> str:
    """sha256 of the stage name, the cache version and its settings (sorted JSON)."""
    blob = json.dumps({"stage": stage, "version": CACHE_VERSION, "settings": payload}, sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


@dataclass
class CacheHit:
    key: str
    folder: Path
    reused: bool


class StageCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def get_or_build(self, key: str, payload: dict[str, Any], build: Callable[[Optional[Path]], None],
                     load: Callable[[Path], T]) -> tuple[T, CacheHit]:
        """Load entry `key`, or build it with build(folder) under the key's lock and then load it.

        `load` must raise CheckpointError (or OSError/ValueError) for a corrupt entry. In a
        data-parallel run the ranks other than 0 get build(None): train along, write nothing.
        """
        entry = self.root / key
        if not dist.is_main():
            reused = dist.broadcast_object(None)  # rank 0's finding
            if not reused:
                build(None)
            dist.barrier()  # rank 0 has renamed the built entry into place
            return load(entry), CacheHit(key, entry, reused=reused)
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
            reused, value = self._load_entry(key, entry, load)
            dist.broadcast_object(reused)
            if not reused:
                self._build_entry(key, entry, payload, build)
                value = load(entry)
            dist.barrier()
            return value, CacheHit(key, entry, reused=reused)

    def _load_entry(self, key: str, entry: Path, load: Callable[[Path], T]) -> tuple[bool, Optional[T]]:
        """(True, the loaded entry), or (False, None) when there is none; a corrupt one is moved aside."""
        if (entry / META).is_file():
            try:
                return True, load(entry)
            except (CheckpointError, OSError, ValueError, KeyError) as err:
                aside = self.root / f"{key}.corrupt-{int(time.time())}"
                warnings.warn(f"stage cache entry {entry} is corrupt ({err}); moved to {aside} and rebuilding")
                os.replace(entry, aside)
        elif entry.exists():  # a folder without meta.json was never completed: not ours to trust
            shutil.rmtree(entry)
        return False, None

    def _build_entry(self, key: str, entry: Path, payload: dict[str, Any], build: Callable[[Path], None]) -> None:
        """build() into a temp folder, write meta.json last, rename into place (under the caller's lock)."""
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=self.root))
        try:
            build(tmp)
            atomic_write_text(tmp / META, json.dumps({"key": key, "settings": payload}, indent=1,
                                                     sort_keys=True, default=str) + "\n")
            os.replace(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
