"""Run `python -m wartok.sweep ARGS` with faults injected at checkpoint saves (tests only).

WARTOK_FAULTS="kill:c:5,usr2:d:10,tear:a:10" and WARTOK_FAULT_MARKS=<folder>: each fault fires
once (a marker file records it), when stage <s> saves the checkpoint of step <n>:
  kill  SIGKILL right after the save (a crash between steps);
  usr2  SIGUSR2 to this process in the middle of the following step (preemption: the run must
        finish that step, save at its boundary and stop);
  tear  SIGKILL in the middle of writing that checkpoint (half the bytes on disk);
  full  the write fails with ENOSPC (a full disk).
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import torch

import wartok.checkpoint as checkpoint
import wartok.loop as loop

FAULTS = [f.split(":") for f in os.environ.get("WARTOK_FAULTS", "").split(",") if f]
MARKS = Path(os.environ.get("WARTOK_FAULT_MARKS", "."))


def fires(kind: str, stage: str, step: int) -> bool:
    for k, s, n in FAULTS:
        mark = MARKS / f"{k}-{s}-{n}"
        if (k, s, int(n)) == (kind, stage, step) and not mark.exists():
            mark.touch()
            return True
    return False


original_save, original_torch_save = checkpoint.StageCheckpointer.save, torch.save


def save(self, step, state):
    if fires("tear", self.stage, step):
        def torn(obj, handle, *args, **kwargs):
            original_torch_save(obj, handle, *args, **kwargs)
            handle.truncate(handle.tell() // 2)
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoint.torch.save = torn
    if fires("full", self.stage, step):
        def full(obj, handle, *args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        checkpoint.torch.save = full
    try:
        path = original_save(self, step, state)
    finally:
        checkpoint.torch.save = original_torch_save
    if fires("kill", self.stage, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if fires("usr2", self.stage, step):
        signal_during_next_step()
    return path


def signal_during_next_step() -> None:
    """SIGUSR2 once, from inside the next step (after its optimizer step, before its boundary)."""
    original_add = loop.Averages.add

    def add(self, scalars, keep):
        loop.Averages.add = original_add
        os.kill(os.getpid(), signal.SIGUSR2)
        return original_add(self, scalars, keep)

    loop.Averages.add = add


checkpoint.StageCheckpointer.save = save

if __name__ == "__main__":
    from wartok.sweep import main

    sys.argv = ["wartok.sweep", *sys.argv[1:]]
    main()
