"""The end of a multirun: one `sweep.json` beside the jobs, and the jobs' metrics side by side.

A Hydra callback (configured in configs/config.yaml) so that it runs after any sweeper and
launcher: it reads only the jobs' result.json files, the same files analysis/ reads. A job
folder without a result (a job that never started, or was killed) is counted as `missing`.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from wartok.results import atomic_write_text, read_result, utc_now

SUMMARY_NAME = "sweep.json"
# The columns printed for a comparison; analysis/make_tables.py makes the paper tables.
SHOWN = ("ar_loss", "psnr", "codebook_usage", "token_perplexity", "rfid", "gfid")


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders of a sweep: every folder holding a .hydra/ copy of its config."""
    return sorted((p.parent for p in sweep_dir.glob("**/.hydra")), key=lambda p: str(p.relative_to(sweep_dir)))


def read_job(folder: Path, sweep_dir: Path) -> dict[str, Any]:
    job: dict[str, Any] = {"run_dir": str(folder.relative_to(sweep_dir)), "status": "missing"}
    try:
        result = read_result(folder / "result.json")
    except FileNotFoundError:
        return job
    except (ValueError, OSError) as err:
        return {**job, "status": "unreadable", "error": str(err)}
    metrics = {name: entry["value"] for name, entry in result["metrics"].items()}
    return {**job, "status": result["status"], "method": result["method"], "seed": result["seed"],
            "overrides": result["overrides"], "error": result["error"], "metrics": metrics,
            "slurm_job_id": result.get("slurm_job_id")}


def summarise(sweep_dir: Path, name: str, objective: str = "ar_loss") -> dict[str, Any]:
    jobs = [read_job(folder, sweep_dir) for folder in job_folders(sweep_dir)]
    done = [j for j in jobs if j["status"] == "completed" and j["metrics"].get(objective) is not None]
    best = min(done, key=lambda j: j["metrics"][objective]) if done else None
    return {"sweep_dir": str(sweep_dir), "name": name, "written_utc": utc_now(), "objective": objective,
            "status_counts": dict(Counter(j["status"] for j in jobs)),
            "best": None if best is None else {"run_dir": best["run_dir"], objective: best["metrics"][objective],
                                               "overrides": best["overrides"]},
            "jobs": jobs}


def format_comparison(summary: dict[str, Any]) -> str:
    """One line per job: its overrides, status and the main metrics."""
    shown = [m for m in SHOWN if any(m in j.get("metrics", {}) for j in summary["jobs"])]
    rows = [["job", "overrides", "status", *shown]]
    for job in summary["jobs"]:
        values = job.get("metrics", {})
        rows.append([job["run_dir"], " ".join(job.get("overrides", [])), job["status"],
                     *(_fmt(values.get(m)) for m in shown)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(summary["status_counts"].items()))
    return f"sweep {summary['name']} ({counts})\n" + "\n".join(lines)


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


class SweepSummary(Callback):
    """Writes sweep.json and prints the comparison when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        summary = summarise(sweep_dir, str(config.get("name", "sweep")))
        atomic_write_text(sweep_dir / SUMMARY_NAME, json.dumps(summary, indent=2, sort_keys=True) + "\n")
        print(format_comparison(summary))
        print(f"sweep summary: {sweep_dir / SUMMARY_NAME}")
