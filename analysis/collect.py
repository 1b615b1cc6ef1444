"""Every run under some folders as one tidy pandas table: one row per run.

Sources, merged into one table:
- each `result.json` under the folders, validated by `wartok.results.validate_result`;
- run folders with a `scalars.jsonl` but no result.json (a job still running, or killed hard
  before it could write one): a row with status "incomplete";
- each `sweep.json`: its jobs add `sweep_name`, `sweep_job` and `sweep_job_status` to the runs
  they name; a job whose run left no result becomes a row of its own ("failed" if the sweep
  says so, else "incomplete");
- an Optuna storage URL, when given: each trial's study, number, state and objective join the
  run it launched (named by a trial user attribute `run_dir` or `run_id`, else the one run
  whose config equals the trial's parameters); a trial with no unique run is a row of its own.

A corrupt or schema-breaking file is reported with a `CorruptResultWarning` naming its path and
skipped, so one bad file never hides the others.

Columns: run_dir, source, status, error, method, seed, run_id, the result's bookkeeping
fields, every flattened config key under its own name (a key that would shadow one of these
columns gets a "config." prefix; list values become JSON text so that they can be grouped),
and for each metric `<metric>`, `<metric>_n` and `<metric>_reliable`.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from wartok.results import validate_result

RESULT_NAME = "result.json"
SCALARS_NAME = "scalars.jsonl"
SWEEP_NAME = "sweep.json"
METRICS = ("ar_loss", "ar_loss_bits", "rfid", "rkid", "gfid", "gkid", "is", "psnr", "codebook_usage",
           "token_perplexity")
LEADING_COLUMNS = ("run_dir", "source", "status", "error", "method", "seed", "run_id", "sweep_name",
                   "sweep_job", "sweep_job_status", "optuna_study", "optuna_trial", "optuna_state",
                   "optuna_value", "schema_version", "git_commit", "git_dirty", "started_utc", "ended_utc",
                   "wall_seconds")
# Keys a sweep.json job may use for its run folder and number; the first one present wins.
JOB_DIR_KEYS = ("run_dir", "output_dir", "dir", "path")
JOB_NUM_KEYS = ("job_num", "num", "index", "job")


class CorruptResultWarning(UserWarning):
    """A result, sweep or scalars file that could not be read; it was skipped."""


def collect_runs(folders: Iterable[str | Path], optuna_storage: str | None = None) -> pd.DataFrame:
    """The tidy table of every run under `folders` (and in `optuna_storage`), sorted by run_dir."""
    rows: dict[Path, dict[str, Any]] = {}
    sweeps: list[tuple[Path, dict[str, Any]]] = []
    for folder in (Path(f) for f in folders):
        if not folder.is_dir():
            warnings.warn(f"results folder {folder} does not exist; nothing read from it", CorruptResultWarning,
                          stacklevel=2)
            continue
        for path in sorted(folder.rglob(RESULT_NAME)):
            result = load_json(path, validate_result)
            if result is not None:
                rows[path.parent.resolve()] = result_row(result, path.parent)
        for path in sorted(folder.rglob(SCALARS_NAME)):
            run_dir = path.parent
            if run_dir.resolve() not in rows and not (run_dir / RESULT_NAME).exists():
                rows[run_dir.resolve()] = {"run_dir": str(run_dir), "source": "scalars", "status": "incomplete"}
        for path in sorted(folder.rglob(SWEEP_NAME)):
            sweep = load_json(path, validate_sweep)
            if sweep is not None:
                sweeps.append((path, sweep))
    for path, sweep in sweeps:
        apply_sweep(rows, path, sweep)
    extra = apply_optuna(rows, optuna_storage) if optuna_storage else []
    return tidy_frame(list(rows.values()) + extra)


def load_json(path: Path, validate) -> dict[str, Any] | None:
    """The parsed and validated file, or None after a warning naming the path and the problem."""
    try:
        data = json.loads(path.read_text())
        validate(data)
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
        warnings.warn(f"skipping {path}: {type(err).__name__}: {err}", CorruptResultWarning, stacklevel=3)
        return None
    return data


def result_row(result: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    row: dict[str, Any] = {"run_dir": str(run_dir), "source": "result"}
    for key in ("status", "error", "method", "seed", "run_id", "schema_version", "git_commit", "git_dirty",
                "started_utc", "ended_utc", "wall_seconds"):
        row[key] = result.get(key)
    row.update(config_columns(result["config"]))
    row.update(metric_columns(result["metrics"]))
    return row


def config_columns(config: dict[str, Any]) -> dict[str, Any]:
    """Flattened config keys as columns; lists and dicts as JSON text (hashable, CSV-stable)."""
    reserved = set(LEADING_COLUMNS) | set(METRICS) | {f"{m}_{s}" for m in METRICS for s in ("n", "reliable")}
    columns = {}
    for key, value in config.items():
        if isinstance(value, (list, dict)):
            value = json.dumps(value, sort_keys=True)
        # method and seed are top-level fields too; keep the top-level ones, they are the same values
        if key in ("method", "seed"):
            continue
        columns[f"config.{key}" if key in reserved else key] = value
    return columns


def metric_columns(metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    columns: dict[str, Any] = {}
    for name, entry in metrics.items():
        value = entry.get("value")
        columns[name] = math.nan if value is None else float(value)
        columns[f"{name}_n"] = entry.get("n")
        columns[f"{name}_reliable"] = entry.get("reliable")
    return columns


def validate_sweep(sweep: Any) -> None:
    if not isinstance(sweep, dict) or not isinstance(sweep.get("jobs"), list):
        raise ValueError("sweep.json must be an object with a 'jobs' list")
    for job in sweep["jobs"]:
        if not isinstance(job, dict):
            raise ValueError(f"sweep job {job!r} is not an object")


def apply_sweep(rows: dict[Path, dict[str, Any]], path: Path, sweep: dict[str, Any]) -> None:
    """Tag the runs a sweep names; give its jobs without a result a row of their own."""
    name = sweep.get("name") or path.parent.name
    for position, job in enumerate(sweep["jobs"]):
        job_num = next((job[k] for k in JOB_NUM_KEYS if k in job), position)
        job_dir = next((job[k] for k in JOB_DIR_KEYS if job.get(k)), str(job_num))
        run_dir = Path(job_dir) if Path(job_dir).is_absolute() else path.parent / job_dir
        job_status = job.get("status")
        row = rows.get(run_dir.resolve())
        if row is None or row["source"] == "scalars":
            row = job_row(run_dir, job, "failed" if job_status == "failed" else "incomplete")
            rows[run_dir.resolve()] = row
        row.update({"sweep_name": name, "sweep_job": job_num, "sweep_job_status": job_status})


def job_row(run_dir: Path, job: dict[str, Any], status: str) -> dict[str, Any]:
    """A run known only from its sweep: method and seed from the job or its overrides."""
    overrides = dict(item.split("=", 1) for item in job.get("overrides", []) if "=" in item)
    seed = job.get("seed", overrides.get("seed"))
    return {"run_dir": str(run_dir), "source": "sweep", "status": status, "error": job.get("error"),
            "method": job.get("method", overrides.get("method")),
            "seed": int(seed) if seed is not None else None}


def apply_optuna(rows: dict[Path, dict[str, Any]], storage: str) -> list[dict[str, Any]]:
    """Join each trial to its run; return rows for the trials that match no single run."""
    import optuna  # only when a storage is given: importing optuna costs about a second

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    unmatched = []
    for summary in sorted(optuna.get_all_study_summaries(storage=storage), key=lambda s: s.study_name):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for trial in study.trials:
            tags = {"optuna_study": summary.study_name, "optuna_trial": trial.number,
                    "optuna_state": trial.state.name, "optuna_value": trial.value}
            row = match_trial(rows, trial.params, trial.user_attrs)
            if row is not None:
                row.update(tags)
                continue
            status = {"COMPLETE": "completed", "FAIL": "failed"}.get(trial.state.name, "incomplete")
            unmatched.append({"run_dir": f"optuna:{summary.study_name}/{trial.number}", "source": "optuna",
                              "status": status, **tags})
    return unmatched


def match_trial(rows: dict[Path, dict[str, Any]], params: dict[str, Any],
                user_attrs: dict[str, Any]) -> dict[str, Any] | None:
    """The run a trial launched: by a `run_dir`/`run_id` user attribute, else a unique parameter match."""
    if user_attrs.get("run_dir"):
        return rows.get(Path(user_attrs["run_dir"]).resolve())
    candidates = [row for row in rows.values() if row["source"] == "result"]
    if user_attrs.get("run_id"):
        matches = [row for row in candidates if row.get("run_id") == user_attrs["run_id"]]
    else:
        matches = [row for row in candidates if params and all(same_value(row_value(row, k), v)
                                                               for k, v in params.items())]
    return matches[0] if len(matches) == 1 else None


def row_value(row: dict[str, Any], key: str) -> Any:
    return row.get(key, row.get(f"config.{key}"))


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def tidy_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows -> a frame with a fixed column order, stable dtypes and a stable row order."""
    frame = pd.DataFrame(rows)
    for name in METRICS:  # every known metric has its three columns, reported or not
        for column in (name, f"{name}_n", f"{name}_reliable"):
            if column not in frame:
                frame[column] = math.nan if column == name else None
    for column in LEADING_COLUMNS:
        if column not in frame:
            frame[column] = None
    metric_names = sorted(c for c in frame.columns if f"{c}_n" in frame.columns)
    metric_cols = [f"{m}{suffix}" for m in metric_names for suffix in ("", "_n", "_reliable")]
    config_cols = sorted(set(frame.columns) - set(LEADING_COLUMNS) - set(metric_cols))
    frame = frame[list(LEADING_COLUMNS) + config_cols + metric_cols]
    for name in metric_names:
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
        frame[f"{name}_n"] = pd.array(frame[f"{name}_n"].tolist(), dtype="Int64")
        frame[f"{name}_reliable"] = pd.array(frame[f"{name}_reliable"].tolist(), dtype="boolean")
    for column in ("seed", "sweep_job", "optuna_trial"):
        frame[column] = pd.array([None if pd.isna(v) else int(v) for v in frame[column]], dtype="Int64")
    return frame.sort_values(["run_dir", "source"], kind="stable").reset_index(drop=True)


def save_table(frame: pd.DataFrame, out_dir: Path, stem: str = "runs") -> list[Path]:
    """Write `<stem>.csv`, and `<stem>.parquet` where pyarrow is installed; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{stem}.csv"]
    frame.to_csv(written[0], index=False, lineterminator="\n")
    try:
        import pyarrow  # noqa: F401  (optional: Parquet only where it is installed)
    except ImportError:
        return written
    parquet = out_dir / f"{stem}.parquet"
    # JSON-like object columns (mixed None/str/bool) as text, so the Parquet schema is stable
    objects = [c for c in frame.columns if frame[c].dtype == object]
    frame.astype({c: "string" for c in objects}).to_parquet(parquet, index=False)
    written.append(parquet)
    return written


def completed(frame: pd.DataFrame) -> pd.DataFrame:
    """Only the runs that finished: the ones every table and figure aggregates."""
    return frame[frame["status"] == "completed"]


def load_scalars(runs: pd.DataFrame) -> pd.DataFrame:
    """The scalars.jsonl curves of these runs in long form: run_dir, method, seed, stage, step,
    global_step (the tokenizer's step: stage c counted on from the end of stage a; other stages
    keep their own step), term, value.

    A line that is not valid JSON (a run killed mid-write) is reported and skipped.
    """
    frames = []
    for _, run in runs.iterrows():
        path = Path(run["run_dir"]) / SCALARS_NAME
        if not path.is_file():
            continue
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            try:
                record = json.loads(line)
                records.append({"stage": str(record.pop("stage")), "step": int(record.pop("step")), **record})
            except (ValueError, KeyError, TypeError) as err:
                warnings.warn(f"skipping line {number} of {path}: {type(err).__name__}: {err}",
                              CorruptResultWarning, stacklevel=2)
        if records:
            frames.append(curve_frame(pd.DataFrame(records), run))
    columns = ["run_dir", "method", "seed", "stage", "step", "global_step", "term", "value"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def curve_frame(records: pd.DataFrame, run: pd.Series) -> pd.DataFrame:
    # stage c continues the tokenizer of stage a from step 1 again: count on from a's last step
    a_steps = records.loc[records["stage"] == "a", "step"]
    offset = int(a_steps.max()) if len(a_steps) else 0
    records["global_step"] = records["step"] + (records["stage"] == "c") * offset
    long = records.melt(id_vars=["stage", "step", "global_step"], var_name="term", value_name="value")
    long = long[pd.to_numeric(long["value"], errors="coerce").notna()].copy()
    long["value"] = long["value"].astype(float)
    long["run_dir"], long["method"], long["seed"] = run["run_dir"], run["method"], run["seed"]
    return long
