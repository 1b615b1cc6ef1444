"""The users' command on a real SLURM: slurmctld + slurmd + munged on localhost, started here.

    python -m wartok.sweep -m sweeps=wgf_weight hydra/launcher=submitit_slurm

Marked `slurm` (run with `pytest -m slurm`; `.ci/run` does). Needs root and
`apt-get install -y slurm-wlm munge`; tests/slurm/localcluster.sh starts a throw-away cluster
that listens on 127.0.0.1 only and keeps every file under a temp folder. Jobs run as SLURM jobs
of that cluster: each result.json carries the SLURM job id its job ran under.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from wartok.results import read_result
from wartok.sweep import PROJECT_ROOT

pytestmark = pytest.mark.slurm
CLUSTER = Path(__file__).parent / "slurm" / "localcluster.sh"
SMALL = ["experiment=smoke", "metrics.enabled=false", "stage_a.steps=6", "stage_b.steps=4", "stage_c.steps=4",
         "stage_d.steps=4", "data.train_subset=128", "data.heldout_subset=64", "eval.num_grid_images=4"]


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """The environment that points sbatch, squeue and submitit at the local cluster."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(b) is None]
    if missing or os.geteuid() != 0:
        pytest.fail(f"the slurm tests need root and `apt-get install -y slurm-wlm munge` (missing: {missing})")
    # not under pytest's tmp folders: those are private to root, and munged runs as `munge`
    folder = Path(tempfile.mkdtemp(prefix="wartok-slurm-"))
    folder.chmod(0o755)
    start = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf"), "WARTOK_CACHE": str(folder / "cache")}
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], capture_output=True, timeout=120)
    shutil.rmtree(folder, ignore_errors=True)


def sweep(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wartok.sweep", "-m", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def slurm_results(sweep_dir: Path) -> list[dict]:
    results = [read_result(p) for p in sorted(sweep_dir.glob("[0-9]*/result.json"))]
    submitted = {p.name for p in (sweep_dir / ".submitit").iterdir()}  # submitit's folder per SLURM job id
    for result in results:
        assert result["status"] == "completed", result.get("error")
        job_id = result["slurm_job_id"]
        assert job_id in submitted, (job_id, submitted)
    return results


def test_the_cluster_listens_on_loopback_only(slurm: dict[str, str]) -> None:
    listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    lines = [line for line in listening.splitlines() if "slurm" in line]
    assert len(lines) >= 2 and all(" 127.0.0.1:" in line for line in lines), lines


def test_the_wgf_weight_grid_runs_as_slurm_jobs(slurm: dict[str, str], tmp_path: Path) -> None:
    sweep_dir = tmp_path / "wgf_weight"
    proc = sweep(["sweeps=wgf_weight", "hydra/launcher=submitit_slurm", *SMALL, "tvc.prior.weight=0,0.01", "seed=0",
                  f"hydra.sweep.dir={sweep_dir}"], slurm)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = slurm_results(sweep_dir)
    assert sorted(r["config"]["tvc.prior.weight"] for r in results) == [0.0, 0.01]
    assert (sweep_dir / "sweep.json").is_file()


def test_the_optuna_study_runs_its_trials_as_slurm_jobs(slurm: dict[str, str], tmp_path: Path) -> None:
    sweep_dir = tmp_path / "optuna_tvc"
    proc = sweep(["sweeps=optuna_tvc", "hydra/launcher=submitit_slurm", *SMALL, "hydra.sweeper.n_trials=2",
                  "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={sweep_dir}"], slurm)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(slurm_results(sweep_dir)) == 2
    assert (sweep_dir / "optuna.db").is_file()


def test_scontrol_requeue_resumes_from_the_checkpoint_with_the_same_result(slurm: dict[str, str],
                                                                            tmp_path: Path) -> None:
    """A running job requeued by SLURM (SIGTERM, then the same job id runs again) resumes from its
    run folder's checkpoint and ends with exactly the metrics of an uninterrupted run."""
    run = [*SMALL, "reuse_stages=false", "checkpoint.every=2", "stage_a.steps=40", "stage_a.log_every=5"]
    # the SLURM job runs on its one CPU (SLURM_CPUS_PER_TASK=1 sets torch's threads), and float
    # reductions depend on the thread count: the uninterrupted reference uses one thread too
    straight = subprocess.run([sys.executable, "-m", "wartok.sweep", *run, f"hydra.run.dir={tmp_path / 'straight'}"],
                              cwd=PROJECT_ROOT, env={**slurm, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    sweep_dir = tmp_path / "requeued"
    proc = subprocess.Popen([sys.executable, "-m", "wartok.sweep", "-m", *run, "hydra/launcher=slurm_localhost",
                             f"hydra.sweep.dir={sweep_dir}"], cwd=PROJECT_ROOT, env=slurm,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pointer = sweep_dir / "0" / "checkpoints" / "stage_a" / "latest"
    deadline = time.time() + 300
    while not pointer.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert pointer.exists(), "the job never wrote its first checkpoint"
    job_id = next(p.name for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+(_\d+)?", p.name))
    requeue = subprocess.run(["scontrol", "requeue", job_id], env=slurm, capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]

    logs = "".join(p.read_text() for p in (sweep_dir / ".submitit").rglob("*.out"))
    assert logs.count("Starting with JobEnvironment") >= 2, logs[-3000:]  # the same job ran again
    result = read_result(sweep_dir / "0" / "result.json")
    assert result["status"] == "completed"
    expected = read_result(tmp_path / "straight" / "result.json")["metrics"]
    for name in ("ar_loss", "psnr", "codebook_usage", "token_perplexity"):
        assert result["metrics"][name]["value"] == expected[name]["value"], name
