"""Sweeps on this machine: grid and Optuna studies resume, fail per trial, and requeue under submitit.

Every test runs the user's command (`python -m wartok.sweep -m sweeps=...`) in a subprocess with
`experiment=smoke`, shrunk further (FID off, a few steps per stage), in its own sweep folder and
stage cache. The SLURM versions of these commands are in test_slurm.py.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from hydra.core.utils import JobReturn, JobStatus

from wartok.optuna_resume import trial_outcome
from wartok.results import read_result
from wartok.sweep import PROJECT_ROOT

SMALL = ["experiment=smoke", "device=cpu", "metrics.enabled=false", "stage_a.steps=6", "stage_b.steps=4",
         "stage_c.steps=4", "stage_d.steps=4", "data.train_subset=128", "data.heldout_subset=64",
         "eval.num_grid_images=4"]
HUGE_LR = "1e30"  # as stage C's lr, its first step makes the loss non-finite: the job raises
DIVERGES = f"stage_c.optim.lr={HUGE_LR}"


def sweep(args: list[str], cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WARTOK_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "wartok.sweep", "-m", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run_ids(sweep_dir: Path) -> dict[str, tuple[str, str]]:
    """job folder -> (status, run_id) of every result.json in the sweep."""
    out = {}
    for path in sorted(sweep_dir.glob("[0-9]*/result.json")):
        result = read_result(path)
        out[path.parent.name] = (result["status"], result["run_id"])
    return out


def test_a_grid_sweep_resumes_skipping_completed_jobs_and_retrying_failed_ones(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "grid"
    args = ["sweeps=wgf_weight", *SMALL, "tvc.prior.weight=0,0.01", "seed=0", f"stage_c.optim.lr=2e-4,{HUGE_LR}",
            f"hydra.sweep.dir={sweep_dir}"]
    first = sweep(args, tmp_path / "cache")
    assert first.returncode != 0, first.stderr[-3000:]  # two jobs failed: the sweep says so, after running all
    before = run_ids(sweep_dir)
    assert sorted(status for status, _ in before.values()) == ["completed", "completed", "failed", "failed"], \
        first.stderr[-3000:]
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["status_counts"] == {"completed": 2, "failed": 2}
    completed_bytes = {job: (sweep_dir / job / "result.json").read_bytes()
                       for job, (status, _) in before.items() if status == "completed"}

    second = sweep(args, tmp_path / "cache")
    after = run_ids(sweep_dir)
    assert after.keys() == before.keys()  # no new folders, none reused for other overrides
    for job, (status, run_id) in before.items():
        if status == "completed":  # skipped: not recomputed, not rewritten
            assert (sweep_dir / job / "result.json").read_bytes() == completed_bytes[job]
            assert "skipped" in second.stderr + second.stdout
        else:  # retried in its own folder
            assert after[job][1] != run_id and after[job][0] == "failed"


def study(sweep_dir: Path, name: str = "optuna_tvc_smoke") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def test_an_optuna_study_resumes_to_its_total_and_survives_failures(tmp_path: Path) -> None:
    sweep_dir, cache = tmp_path / "optuna", tmp_path / "cache"
    base = ["sweeps=optuna_tvc", *SMALL, f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.n_jobs=1"]
    first = sweep([*base, "hydra.sweeper.n_trials=2"], cache)
    assert first.returncode == 0, first.stderr[-3000:]
    assert [t.state.name for t in study(sweep_dir).trials] == ["COMPLETE", "COMPLETE"]

    # a sweep killed mid-trial leaves its trial RUNNING in the storage
    stale = study(sweep_dir).ask()
    stale.set_user_attr("sweep_dir", str(sweep_dir.absolute()))

    # trials that raise are recorded as failed, and the sweep goes on within its failure budget
    failing = sweep([*base, "hydra.sweeper.n_trials=4", DIVERGES, "hydra.sweeper.max_failures=2"], cache)
    assert failing.returncode == 0, failing.stderr[-3000:]
    over_budget = sweep([*base, "hydra.sweeper.n_trials=6", DIVERGES, "hydra.sweeper.max_failures=2"], cache)
    assert over_budget.returncode != 0 and "max_failures=2" in over_budget.stderr

    last = sweep([*base, "hydra.sweeper.n_trials=6"], cache)  # n_trials is the study's total
    assert last.returncode == 0, last.stderr[-3000:]
    trials = study(sweep_dir).trials
    states = [t.state.name for t in trials]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "FAIL", "FAIL", "FAIL", "COMPLETE"], states
    assert trials[2].user_attrs["abandoned"] is True  # the stale one: failed, and not counted
    for trial in trials[3:6]:
        assert "NonFiniteLoss" in trial.user_attrs["fail_reason"]
    counted = [t for t in trials if not t.user_attrs.get("abandoned")]
    assert len(counted) == 6
    # job folders are never reused, and the resumed sampler does not replay earlier parameters
    assert sorted(int(t.user_attrs["job_num"]) for t in counted) == list(range(6))
    params = [tuple(sorted(t.params.items())) for t in counted]
    assert len(set(params)) == len(params)
    assert sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit()) == [str(i) for i in range(6)]
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["optuna"]["state_counts"] == {"COMPLETE": 3, "FAIL": 4}
    assert summary["best"]["optuna_trial"] in (0, 1, 6)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_objective_is_a_failed_trial_with_its_reason(tmp_path: Path, value: float) -> None:
    ret = JobReturn()
    ret.status, ret.return_value = JobStatus.COMPLETED, value
    values, reason, _ = trial_outcome(ret, tmp_path, ["ar_loss"])
    assert values is None and "non-finite objective" in reason
    ret.return_value = 1.5
    assert trial_outcome(ret, tmp_path, ["ar_loss"])[0] == [1.5]


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_a_preempted_submitit_job_requeues_and_finishes_as_if_uninterrupted(tmp_path: Path) -> None:
    """The real path: SIGUSR2 to the job's process (what SLURM and submitit send on preemption or
    time-out), our handler saves at the next step boundary, submitit's handler calls the
    launcher's checkpoint() and requeues, the new process resumes from the run folder's checkpoint."""
    cache = tmp_path / "cache"
    run = [*SMALL, "reuse_stages=false", "checkpoint.every=2", "stage_a.steps=30", "stage_a.log_every=5"]
    straight = subprocess.run([sys.executable, "-m", "wartok.sweep", *run, f"hydra.run.dir={tmp_path / 'straight'}"],
                              cwd=PROJECT_ROOT, env={**os.environ, "WARTOK_CACHE": str(cache)},
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    sweep_dir = tmp_path / "requeued"
    proc = subprocess.Popen([sys.executable, "-m", "wartok.sweep", "-m", *run, "hydra/launcher=submitit_local",
                             "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep_dir}"],
                            cwd=PROJECT_ROOT, env={**os.environ, "WARTOK_CACHE": str(cache)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pointer = sweep_dir / "0" / "checkpoints" / "stage_a" / "latest"
    deadline = time.time() + 300
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    controllers = [int(p.name) for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()]
    tasks = [task for pid in controllers for task in _children(pid)]
    assert len(tasks) == 1, (controllers, tasks)
    os.kill(tasks[0], signal.SIGUSR2)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]

    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*.out"))
    assert "Caught signal SIGUSR2" in logs and "Calling checkpoint method" in logs  # it was requeued
    result = read_result(sweep_dir / "0" / "result.json")
    assert result["status"] == "completed"
    expected = read_result(tmp_path / "straight" / "result.json")["metrics"]
    for name in ("ar_loss", "psnr", "codebook_usage", "token_perplexity"):
        assert result["metrics"][name]["value"] == expected[name]["value"], name
    assert math.isfinite(result["metrics"]["ar_loss"]["value"])


def test_a_storage_password_never_reaches_a_file_or_the_output(tmp_path: Path) -> None:
    """The URL comes from the environment, the server is unreachable, the sweep fails: neither its
    error path nor any file it wrote (configs, .hydra copies, logs, sweep.json) shows the password.
    (tests/test_postgres.py checks the same on a real server, through a whole study.)"""
    secret = "pw-Zq8-must-not-leak"
    sweep_dir = tmp_path / "optuna"
    env = {**os.environ, "WARTOK_CACHE": str(tmp_path / "cache"),
           "WARTOK_OPTUNA_STORAGE": f"postgresql+psycopg2://wartok:{secret}@127.0.0.1:1/optuna"}
    proc = subprocess.run([sys.executable, "-m", "wartok.sweep", "-m", "sweeps=optuna_tvc", *SMALL,
                           f"hydra.sweep.dir={sweep_dir}"], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode != 0 and "127.0.0.1" in proc.stderr  # it did try that server
    assert secret not in proc.stdout + proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "multirun.yaml" for p in written)
    assert [str(p) for p in written if secret.encode() in p.read_bytes()] == []


@pytest.mark.parametrize(("study", "narrowed"), [
    ("baselines", ["seed=0"]),  # 3 methods, plus the two-stage frontier grid (its own seeds win): 11 jobs
    ("tracker_refresh", ["tvc.prior.tracker.refresh_every=1,4", "seed=0"]),
    ("codebook_size", ["tokenizer.quantizer.codebook_size=16", "seed=0"]),
    ("seeds", ["seed=0,1"]),
])
def test_every_grid_study_runs_on_the_smoke_experiment(study: str, narrowed: list[str], tmp_path: Path) -> None:
    """Each study file of sweeps/ (wgf_weight and optuna_tvc are run above) as its users run it,
    on the smoke experiment, its grid narrowed from the command line: every job completes and
    the sweep's summary counts them."""
    sweep_dir = tmp_path / study
    proc = sweep([f"sweeps={study}", *SMALL, *narrowed, f"hydra.sweep.dir={sweep_dir}"], tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = [status for status, _ in run_ids(sweep_dir).values()]
    expected = {"baselines": 3 + 4 * 2, "tracker_refresh": 2, "codebook_size": 2, "seeds": 2}[study]
    assert statuses == ["completed"] * expected
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["status_counts"] == {"completed": expected}
