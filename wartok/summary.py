"""The end of a multirun: one `sweep.json` beside the jobs, and the jobs' metrics side by side.

A Hydra callback (configured in configs/config.yaml) so that it runs after any sweeper and
launcher: it reads only the jobs' result.json files, the same files analysis/ reads. A job
folder without a result (a job that never started, or was killed) is counted as `missing`.
After an Optuna sweep it also reads the study: trial states, the best trial (one objective)
or the Pareto front (several), each trial's job folder, and the storage with its password
hidden. The resumable sweepers (wartok/launch.py) call `write_summary` themselves when a
sweep stops on failures, since Hydra skips on_multirun_end then.
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
    if folder.name.isdigit():
        job["job_num"] = int(folder.name)
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
    known = [set(j["overrides"]) for j in summary["jobs"] if j.get("overrides")]
    common = set.intersection(*known) if len(known) > 1 else set()  # printed once, above the table
    rows = [["job", "overrides", "status", *shown]]
    for job in summary["jobs"]:
        values = job.get("metrics", {})
        rows.append([job["run_dir"], " ".join(o for o in job.get("overrides", []) if o not in common), job["status"],
                     *(_fmt(values.get(m)) for m in shown)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(summary["status_counts"].items()))
    shared = [o for o in summary["jobs"][0].get("overrides", []) if o in common] if common else []
    header = f"sweep {summary['name']} ({counts})" + (f"\nevery job: {' '.join(shared)}" if shared else "")
    return header + "\n" + "\n".join(lines)


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def study_summary(sweeper: DictConfig, sweep_dir: Path) -> dict[str, Any]:
    """The Optuna study of a sweep: trial states, best trial / Pareto front, each trial's job folder."""
    import optuna
    from optuna.trial import TrialState

    from wartok.launch import optuna_storage, redact

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = optuna_storage(sweeper.get("storage"), sweep_dir)
    study = optuna.load_study(study_name=str(sweeper.study_name), storage=url)
    trials = study.get_trials(deepcopy=False)

    def row(trial: Any) -> dict[str, Any]:
        run_dir = trial.user_attrs.get("run_dir")
        if run_dir and Path(run_dir).is_relative_to(sweep_dir.absolute()):
            run_dir = str(Path(run_dir).relative_to(sweep_dir.absolute()))
        return {"number": trial.number, "state": trial.state.name, "values": trial.values, "params": trial.params,
                "run_dir": run_dir, "fail_reason": trial.user_attrs.get("fail_reason"),
                "abandoned": bool(trial.user_attrs.get("abandoned", False))}

    best = study.best_trials if any(t.state == TrialState.COMPLETE for t in trials) else []
    return {"study_name": study.study_name, "storage": redact(url),
            "objectives": list(sweeper.get("objectives") or ["value"]),
            "directions": [d.name.lower() for d in study.directions], "n_trials": sweeper.get("n_trials"),
            "state_counts": dict(Counter(t.state.name for t in trials)),
            "best_trials": [row(t) for t in best],  # the Pareto front; one trial for one objective
            "trials": [row(t) for t in trials]}


def is_optuna(sweeper: DictConfig) -> bool:
    return "study_name" in sweeper and "n_trials" in sweeper


def write_summary(config: DictConfig) -> Optional[dict[str, Any]]:
    """Write sweep.json for the multirun `config` describes and print the comparison."""
    sweep_dir = Path(config.hydra.sweep.dir)
    if not sweep_dir.is_dir():
        return None
    sweeper = config.hydra.sweeper
    objectives = list(sweeper.get("objectives") or ["ar_loss"]) if is_optuna(sweeper) else ["ar_loss"]
    summary = summarise(sweep_dir, str(config.get("name", "sweep")), objectives[0])
    if is_optuna(sweeper):
        try:
            study = study_summary(sweeper, sweep_dir)
        except Exception as err:  # an in-memory study (the plain plugin) or an unreachable storage
            study = {"error": f"{type(err).__name__}: {err}"}
        summary["optuna"] = study
        by_dir = {t["run_dir"]: t for t in study.get("trials", [])}
        for job in summary["jobs"]:
            if job["run_dir"] in by_dir:
                job["optuna_trial"], job["optuna_state"] = by_dir[job["run_dir"]]["number"], by_dir[job["run_dir"]]["state"]
        if len(objectives) == 1 and study.get("best_trials"):
            top = study["best_trials"][0]
            summary["best"] = {"run_dir": top["run_dir"], objectives[0]: top["values"][0], "params": top["params"],
                               "optuna_trial": top["number"]}
        elif len(objectives) > 1:
            summary["best"] = None  # several objectives: see optuna.best_trials, the Pareto front
    atomic_write_text(sweep_dir / SUMMARY_NAME, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    print(format_comparison(summary))
    print(f"sweep summary: {sweep_dir / SUMMARY_NAME}")
    return summary


class SweepSummary(Callback):
    """Writes sweep.json and prints the comparison when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        write_summary(config)
