"""One run, start to finish: prepare, train and evaluate, and always leave one result.json.

A bad setting raises ConfigError from `prepare` before the clock starts and before anything
is written. Once training has begun, any error is recorded as status `failed` with its
message, and the partial scalars and checkpoints stay beside the result.

A data-parallel run (several processes, see wartok/dist.py) joins its process group here, all
ranks use rank 0's run folder, and only rank 0 writes result.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Iterator

from wartok import dist
from wartok.config import RunConfig
from wartok.loop import STOP, Interrupted
from wartok.pipeline import Prepared, prepare, run_pipeline
from wartok.results import flatten, git_state, package_versions, utc_now, write_result

PACKAGE_ROOT = Path(__file__).resolve().parent
RESULT_NAME = "result.json"


def execute(cfg: RunConfig, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Run the pipeline in `out_dir` and write `out_dir/result.json`; returns the result dict."""
    prep = prepare(cfg)  # ConfigError here: nothing written, no compute spent
    dist.init_distributed(prep.device, prep.dist_info)
    try:
        return record(prep, out_dir, overrides)
    finally:
        dist.cleanup()


def record(prep: Prepared, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """execute's body, once the process group (if any) is up."""
    cfg = prep.cfg
    # Under torchrun every process's Hydra names its own folder (a timestamp, which may differ
    # by a second); rank 0's is the run's, so that all ranks resume from the same checkpoints.
    out_dir = dist.broadcast_object(out_dir)
    if dist.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
    commit, dirty = git_state(PACKAGE_ROOT)
    result: dict[str, Any] = {
        "schema_version": 1,
        "run_id": f"{out_dir.name}-{uuid.uuid4().hex[:8]}",
        "status": "failed",
        "error": None,
        "method": cfg.method,
        "seed": cfg.seed,
        "slurm_job_id": slurm_job_id(),
        "git_commit": commit,
        "git_dirty": dirty,
        "started_utc": utc_now(),
        "versions": package_versions(),
        "config": flatten(dataclasses.asdict(cfg)),
        "overrides": list(overrides),
        "data_source": prep.data.source,
        "metrics": {},
        "artifacts": {},
        "stage_cache": {},
    }
    start = time.perf_counter()
    with stop_on_signals() as received:
        try:
            result["metrics"], result["artifacts"], result["stage_cache"] = run_pipeline(prep, out_dir)
            result["status"] = "completed"
        except Interrupted as err:  # a checkpoint is saved; rerunning the same command resumes
            result["status"], result["error"] = "interrupted", str(err)
        except Exception as err:  # recorded, then re-raised so launchers see the failure too
            result["error"] = f"{type(err).__name__}: {err}"
            result["traceback"] = traceback.format_exc()
            raise
        finally:
            result["ended_utc"] = utc_now()
            result["wall_seconds"] = round(time.perf_counter() - start, 3)
            if dist.is_main():
                write_result(out_dir / RESULT_NAME, result)
    if result["status"] == "interrupted":
        hand_on(received)
    return result


def slurm_job_id() -> str | None:
    """The job's id as squeue, sacct and submitit's folders show it: ARRAY_TASK for array jobs."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, Any]]:
    """SIGUSR2 (submitit's preemption and time-limit signal) and SIGTERM set loop.STOP: the stage
    saves a checkpoint at its next step boundary and the run ends as `interrupted`. Yields a dict
    that receives the signal number and the handler that was installed before ours."""
    received: dict[str, Any] = {}
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        received.update(signum=signum, previous=previous.get(signum))
        STOP.set()

    try:
        for sig in (signal.SIGUSR2, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        STOP.clear()


def hand_on(received: dict[str, Any]) -> None:
    """After the checkpoint: let the handler we displaced act (submitit's requeues the job), then exit."""
    previous, signum = received.get("previous"), received.get("signum", signal.SIGTERM)
    if callable(previous):
        previous(signum, None)
    raise SystemExit(128 + int(signum))


def format_metrics(result: dict[str, Any]) -> str:
    """A short aligned table of the run's metrics, for the terminal."""
    rows = [("metric", "value", "n")]
    for name, entry in sorted(result["metrics"].items()):
        value = entry["value"]
        shown = "unavailable" if value is None else f"{value:.4f}"
        shown += f" {entry['unit']}" if "unit" in entry else ""
        shown += " (unreliable: n < 2048)" if entry.get("reliable") is False and value is not None else ""
        rows.append((name, shown, str(entry["n"])))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    header = f"{result['method']}  seed={result['seed']}  status={result['status']}  {result['wall_seconds']:.0f}s"
    return header + "\n" + "\n".join(lines)
