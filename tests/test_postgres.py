"""A shared Optuna study in a real PostgreSQL server, started here, with a password that leaks nowhere.

Marked `postgres` (run with `pytest -m postgres`; `.ci/run` does). Needs root and PostgreSQL's
server binaries (`apt-get install -y postgresql`). The server is private to the test: its own
data folder, a free port on 127.0.0.1 only, password authentication.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest

from wartok.sweep import PROJECT_ROOT

pytestmark = pytest.mark.postgres
PASSWORD = "pw-7Hq2-never-in-a-file"
SMALL = ["experiment=smoke", "device=cpu", "metrics.enabled=false", "stage_a.steps=6", "stage_b.steps=4",
         "stage_c.steps=4", "stage_d.steps=4", "data.train_subset=128", "data.heldout_subset=64",
         "eval.num_grid_images=4", "hydra.sweeper.n_jobs=1"]


def pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found or os.geteuid() != 0:
        pytest.fail("the postgres tests need root and `apt-get install -y postgresql` (no initdb found)")
    return found[-1].parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(*cmd: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", *cmd], check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def storage_url() -> str:
    bin_dir, port = pg_bin(), free_port()
    folder = Path(tempfile.mkdtemp(prefix="wartok-pg-"))  # pytest's tmp folders are private to root
    folder.chmod(0o755)
    data = folder / "data"
    shutil.chown(folder, "postgres")
    pw_file = folder / "pw"
    pw_file.write_text(PASSWORD + "\n")
    shutil.chown(pw_file, "postgres")
    as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-U", "wartok", "--auth=scram-sha-256",
                f"--pwfile={pw_file}")
    as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "start", "-o",
                f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}")
    url = f"postgresql+psycopg2://wartok:{PASSWORD}@127.0.0.1:{port}/postgres"
    yield url
    as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop")
    shutil.rmtree(folder, ignore_errors=True)


def sweep(args: list[str], env_extra: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, **env_extra}
    return subprocess.Popen([sys.executable, "-m", "wartok.sweep", "-m", "sweeps=optuna_tvc", *SMALL, *args],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    return output


def test_the_server_listens_on_loopback_only(storage_url: str) -> None:
    port = storage_url.rsplit(":", 1)[1].split("/")[0]
    lines = [line for line in subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout.splitlines()
             if f":{port} " in line]
    assert lines and all("127.0.0.1:" in line for line in lines), lines


def test_two_launchers_share_one_study_and_resume_it_without_leaking_the_password(
        storage_url: str, tmp_path: Path) -> None:
    url_file = tmp_path / "secrets" / "optuna_url"  # a file outside the repository, not in any config
    url_file.parent.mkdir()
    url_file.write_text(storage_url + "\n")
    cache = str(tmp_path / "cache")
    name = "hydra.sweeper.study_name=shared_tvc"
    # two sweeps, two folders (two machines, say), one study: n_trials caps the study as a whole
    first = sweep([name, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'a'}"],
                  {"WARTOK_OPTUNA_STORAGE": storage_url, "WARTOK_CACHE": cache})
    second = sweep([name, "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path / 'b'}"],
                   {"WARTOK_OPTUNA_STORAGE_FILE": str(url_file), "WARTOK_CACHE": cache})
    outputs = [finish(first), finish(second)]
    study = optuna.load_study(study_name="shared_tvc", storage=storage_url.replace("+psycopg2", ""))
    trials = study.get_trials()
    assert 3 <= len(trials) <= 4, len(trials)  # overshoot by at most the other worker's batch in flight
    assert {t.user_attrs["sweep_dir"] for t in trials} == {str(tmp_path / "a"), str(tmp_path / "b")}
    assert all(t.state.name == "COMPLETE" for t in trials)

    outputs.append(finish(sweep([name, "hydra.sweeper.n_trials=5", f"hydra.sweep.dir={tmp_path / 'a'}"],
                                {"WARTOK_OPTUNA_STORAGE": storage_url, "WARTOK_CACHE": cache})))
    assert len(study.get_trials()) == 5  # resumed to the study's total

    leaks = [str(p) for p in tmp_path.rglob("*") if p.is_file() and p != url_file
             and PASSWORD.encode() in p.read_bytes()]
    assert leaks == []
    assert not any(PASSWORD in out for out in outputs)
    assert "wartok:***@127.0.0.1" in outputs[0]  # the log names the storage, password hidden


def _open(url: str, barrier) -> int:
    from wartok.optuna_resume import create_or_load_study

    barrier.wait()  # imports done in every process: all create the schema at the same instant
    study = create_or_load_study("race", url, optuna.samplers.TPESampler(seed=0), ["minimize"])
    return len(study.trials)


def test_sweeps_starting_together_on_a_fresh_database_all_open_the_study(storage_url: str) -> None:
    """Several sweeps launched at once race to create Optuna's schema in an empty database; the
    losers of that race get a duplicate-object error, which create_or_load_study retries."""
    import multiprocessing

    import psycopg2

    base = storage_url.replace("postgresql+psycopg2", "postgresql").rsplit("/", 1)[0]
    conn = psycopg2.connect(base + "/postgres")
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    conn.cursor().execute("CREATE DATABASE fresh_race")
    conn.close()
    url = storage_url.rsplit("/", 1)[0] + "/fresh_race"
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, context.Pool(4) as pool:
        barrier = manager.Barrier(4)
        assert pool.starmap(_open, [(url, barrier)] * 4) == [0, 0, 0, 0]
