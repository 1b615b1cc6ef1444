"""One run, start to finish: prepare, train and evaluate, and always leave one result.json.

A bad setting raises ConfigError from `prepare` before the clock starts and before anything
is written. Once training has begun, any error is recorded as status `failed` with its
message, and the partial scalars and checkpoints stay beside the result.
"""
from __future__ import annotations

import dataclasses
import os
import time
import traceback
import uuid
from pathlib import Path
from typing import Any

from wartok.config import RunConfig
from wartok.pipeline import prepare, run_pipeline
from wartok.results import flatten, git_state, package_versions, utc_now, write_result

PACKAGE_ROOT = Path(__file__).resolve().parent
RESULT_NAME = "result.json"


def execute(cfg: RunConfig, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Run the pipeline in `out_dir` and write `out_dir/result.json`; returns the result dict."""
    prep = prepare(cfg)  # ConfigError here: nothing written, no compute spent
    out_dir.mkdir(parents=True, exist_ok=True)
    commit, dirty = git_state(PACKAGE_ROOT)
    result: dict[str, Any] = {
        "schema_version": 1,
        "run_id": f"{out_dir.name}-{uuid.uuid4().hex[:8]}",
        "status": "failed",
        "error": None,
        "method": cfg.method,
        "seed": cfg.seed,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
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
    try:
        result["metrics"], result["artifacts"], result["stage_cache"] = run_pipeline(prep, out_dir)
        result["status"] = "completed"
    except Exception as err:  # recorded, then re-raised so launchers see the failure too
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc()
        raise
    finally:
        result["ended_utc"] = utc_now()
        result["wall_seconds"] = round(time.perf_counter() - start, 3)
        write_result(out_dir / RESULT_NAME, result)
    return result


def format_metrics(result: dict[str, Any]) -> str:
    """A short aligned table of the run's metrics, for the terminal."""
    rows = [("metric", "value", "n")]
    for name, entry in sorted(result["metrics"].items()):
        value = entry["value"]
        shown = "unavailable" if value is None else f"{value:.4f}"
        rows.append((name, shown + (f" {entry['unit']}" if "unit" in entry else ""), str(entry["n"])))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    header = f"{result['method']}  seed={result['seed']}  status={result['status']}  {result['wall_seconds']:.0f}s"
    return header + "\n" + "\n".join(lines)
