"""Atomic, pickle-free checkpoint files.

A checkpoint is a plain dict of tensors, numbers and strings (nanoGPT style), saved to a temp
file, fsynced and renamed, so a crash mid-write never leaves a corrupt file under the final
name. Loading uses `weights_only=True`: a crafted file cannot execute code.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from wartok.results import atomic_write_text, atomic_writer
from wartok.validate import check_choice, check_int


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, corrupt, or holds something other than plain state."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    with atomic_writer(path, "wb") as handle:
        torch.save(state, handle)
    return Path(path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"checkpoint {path} cannot be loaded safely: {str(err).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- stage checkpoints
NONFINITE_ACTIONS = ("fail", "skip")


@dataclass
class CheckpointConfig:
    """When stages save, how many files they keep, and what a non-finite loss does."""

    every: int = 0                  # optimizer steps between checkpoints inside a stage; 0: only at its end
    keep: int = 2                   # checkpoints kept per stage (the newest)
    resume: Optional[str] = None    # a checkpoint file to resume its stage from; missing file: error
    on_nonfinite: str = "fail"      # fail: stop as failed, at the next log line or checkpoint | skip: count it
    max_nonfinite: int = 10         # skip: more skipped steps than this in one stage fail the run

    def __post_init__(self) -> None:
        check_int("checkpoint.every", self.every, 0)
        check_int("checkpoint.keep", self.keep, 1)
        check_choice("checkpoint.on_nonfinite", self.on_nonfinite, NONFINITE_ACTIONS)
        check_int("checkpoint.max_nonfinite", self.max_nonfinite, 0)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch (CPU and CUDA) generator states as plain tensors and numbers."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "words": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["words"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StageCheckpointer:
    """Checkpoints of one stage in `folder`: step_<n>.pt files and a `latest` pointer written last.

    Each file holds the stage's whole state (the caller's dict: models, optimizer, schedule,
    data position, ...) plus the RNG states, the flattened run config and its hash. A file
    whose config differs from the run's is refused with the differing keys.
    """

    def __init__(self, folder: Path, stage: str, config: dict[str, Any], keep: int):
        self.folder, self.stage, self.config, self.keep = Path(folder), stage, config, keep

    def save(self, step: int, state: dict[str, Any]) -> Path:
        path = self.folder / f"step_{step:08d}.pt"
        save_checkpoint(path, {**state, "stage": self.stage, "step": step, "rng": rng_state(),
                               "config": self.config, "config_hash": config_hash(self.config)})
        atomic_write_text(self.folder / "latest", path.name + "\n")
        for old in sorted(self.folder.glob("step_*.pt"))[:-self.keep]:
            old.unlink()
        return path

    def load_latest(self, explicit: Optional[Path] = None) -> Optional[dict[str, Any]]:
        """The explicit file, else the one `latest` names, else None (a fresh start)."""
        if explicit is None:
            pointer = self.folder / "latest"
            if not pointer.is_file():
                return None
            explicit = self.folder / pointer.read_text().strip()
        state = load_checkpoint(explicit)
        if state.get("stage") != self.stage:
            raise CheckpointError(f"checkpoint {explicit} is of stage {state.get('stage')!r}, not {self.stage!r}")
        if state.get("config_hash") != config_hash(self.config):
            raise CheckpointError(f"checkpoint {explicit} was written by a different config; differing keys: "
                                  f"{', '.join(differing_keys(state.get('config', {}), self.config)) or '?'}")
        return state


def config_hash(flat: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))

