"""Exact resume, crashes inside a save, preemption, non-finite steps, full disks, unsafe files.

The end-to-end tests run the real entry point in a subprocess through tests/faults/
run_with_faults.py, which kills (SIGKILL), preempts (SIGUSR2), tears a checkpoint write or
fills the disk at a chosen checkpoint, then compare the resumed run with an uninterrupted one
bit for bit: every stage's final model and optimizer state, and every logged line.
"""
from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wartok.checkpoint import CheckpointConfig, CheckpointError, StageCheckpointer, load_checkpoint
from wartok.loop import NonFiniteLoss, StageContext, run_stage
from wartok.config import StageConfig
from wartok.results import ScalarLog, read_result
from wartok.sweep import PROJECT_ROOT

FAULTS = Path(__file__).parent / "faults" / "run_with_faults.py"
RUN = ["experiment=smoke", "device=cpu", "reuse_stages=false", "metrics.enabled=false", "checkpoint.every=5",
       "checkpoint.keep=10", "stage_a.steps=20", "stage_b.steps=10", "stage_c.steps=10", "stage_d.steps=10",
       "data.train_subset=256", "data.heldout_subset=64", "eval.num_grid_images=4",
       "tvc.prior.tracker.refresh_every=2", "tvc.prior.tracker.lr=1e-3"]


def run(out: Path, faults: str = "", *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WARTOK_FAULTS": faults, "WARTOK_FAULT_MARKS": str(out.parent)}
    return subprocess.run([sys.executable, str(FAULTS), *RUN, f"hydra.run.dir={out}", *overrides],
                          cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)


def final_states(out: Path) -> dict[str, dict]:
    """The last checkpoint of every stage: its models, optimizer and data position."""
    states = {}
    for folder in sorted((out / "checkpoints").glob("stage_*")):
        state = load_checkpoint(folder / (folder / "latest").read_text().strip())
        states[folder.name] = {k: v for k, v in state["objects"].items()}
    return states


def assert_bit_equal(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_bit_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{where}: {a} != {b}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs, one per method."""
    outs = {}
    for method in ("two_stage", "joint", "wartok"):
        out = tmp_path_factory.mktemp(f"straight_{method}") / "run"
        proc = run(out, "", f"method={method}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        outs[method] = out
    return outs


def assert_same_run(resumed: Path, reference: Path) -> None:
    assert read_result(resumed / "result.json")["status"] == "completed"
    assert_bit_equal(final_states(resumed), final_states(reference))
    assert (resumed / "scalars.jsonl").read_text() == (reference / "scalars.jsonl").read_text()
    assert_bit_equal(read_result(resumed / "result.json")["metrics"], read_result(reference / "result.json")["metrics"])


@pytest.mark.parametrize("method", ["two_stage", "joint", "wartok"])
def test_sigkill_in_every_stage_then_resume_equals_an_uninterrupted_run(tmp_path: Path, straight, method) -> None:
    out = tmp_path / "run"
    kills = "kill:a:10,kill:b:5,kill:c:5,kill:d:5" if method == "wartok" else "kill:c:5"
    for _ in range(kills.count(",") + 1):
        proc = run(out, kills, f"method={method}")
        assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL
    proc = run(out, kills, f"method={method}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, straight[method])


def test_a_crash_inside_a_checkpoint_write_keeps_the_previous_one(tmp_path: Path, straight) -> None:
    out = tmp_path / "run"
    proc = run(out, "tear:c:10", "method=wartok")
    assert proc.returncode == -9
    stage_c = out / "checkpoints" / "stage_c"
    assert (stage_c / "latest").read_text().strip() == "step_00000005.pt"
    load_checkpoint(stage_c / "step_00000005.pt")  # still loadable
    assert sorted(p.name for p in stage_c.glob("step_*.pt")) == ["step_00000005.pt"]  # the torn one is a hidden temp
    proc = run(out, "", "method=wartok")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, straight["wartok"])


def test_sigusr2_saves_stops_cleanly_and_the_rerun_finishes_the_same(tmp_path: Path, straight) -> None:
    out = tmp_path / "run"
    proc = run(out, "usr2:c:5", "method=wartok")
    assert proc.returncode == 128 + 12, proc.stderr[-3000:]  # SystemExit(128 + SIGUSR2)
    result = read_result(out / "result.json")
    assert result["status"] == "interrupted" and "step 6" in result["error"]
    assert (out / "checkpoints" / "stage_c" / "latest").read_text().strip() == "step_00000006.pt"
    proc = run(out, "", "method=wartok")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(out, straight["wartok"])


def test_a_full_disk_fails_the_run_clearly_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run(out, "full:c:10", "method=wartok")
    assert proc.returncode != 0
    result = read_result(out / "result.json")
    assert result["status"] == "failed" and "No space left on device" in result["error"]
    stage_c = out / "checkpoints" / "stage_c"
    assert (stage_c / "latest").read_text().strip() == "step_00000005.pt"
    load_checkpoint(stage_c / "step_00000005.pt")
    assert not [p for p in stage_c.iterdir() if p.name.startswith(".")]  # the failed temp file was removed


def test_a_checkpoint_of_another_config_is_refused_with_the_differing_keys(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run(out, "kill:c:5", "method=wartok").returncode == -9
    proc = run(out, "", "method=wartok", "stage_c.optim.lr=1e-3")
    assert proc.returncode != 0
    assert "different config" in proc.stderr and "stage_c.optim.lr" in proc.stderr


def test_an_explicit_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run(out, "", "checkpoint.resume=/nope/stage_c/step_00000005.pt")
    assert proc.returncode == 2 and "checkpoint.resume=/nope" in proc.stderr
    assert not (out / "result.json").exists() and not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------- in-process units
def toy_stage(tmp_path: Path, nan_at: int, cfg: CheckpointConfig):
    model = torch.nn.Linear(3, 1)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))

    def step_fn(step: int):
        loss = model(x).pow(2).mean()
        return (loss * float("nan") if step == nan_at else loss), {"loss": loss.detach()}

    ctx = StageContext(device=torch.device("cpu"), precision="fp32", log=ScalarLog(tmp_path / "s.jsonl"),
                       checkpoint=cfg, checkpoint_dir=tmp_path / "ckpt", config={"x": 1})
    stage = StageConfig(steps=8, log_every=2)
    return model, lambda: run_stage("t", model.parameters(), stage, step_fn, ctx, stateful={"model": model})


def test_an_injected_nan_step_is_skipped_and_counted(tmp_path: Path) -> None:
    model, go = toy_stage(tmp_path, nan_at=3, cfg=CheckpointConfig(every=2, on_nonfinite="skip"))
    summary = go()
    assert summary.nonfinite_skipped == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    for path in (tmp_path / "ckpt" / "stage_t").glob("step_*.pt"):
        state = load_checkpoint(path)["objects"]["model"]
        assert all(torch.isfinite(v).all() for v in state.values()), path
    logged = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [line["nonfinite_skipped"] for line in logged] == [0, 1, 1, 1]  # counted when it happened
    assert all(math.isfinite(line["loss"]) and math.isfinite(line["grad_norm"]) for line in logged)


def test_more_skipped_steps_than_allowed_fail_the_stage_naming_the_first(tmp_path: Path) -> None:
    _, go = toy_stage(tmp_path, nan_at=3, cfg=CheckpointConfig(on_nonfinite="skip", max_nonfinite=0))
    with pytest.raises(NonFiniteLoss, match=r"at step 3 \(loss nan; 1 non-finite steps, more than "
                                            r"checkpoint.max_nonfinite=0\)"):
        go()


def test_an_injected_nan_step_fails_the_stage_and_is_never_checkpointed(tmp_path: Path) -> None:
    _, go = toy_stage(tmp_path, nan_at=3, cfg=CheckpointConfig(every=1, on_nonfinite="fail"))
    with pytest.raises(NonFiniteLoss, match="step 3"):
        go()
    saved = sorted(p.name for p in (tmp_path / "ckpt" / "stage_t").glob("step_*.pt"))
    assert saved == ["step_00000002.pt", "step_00000003.pt"]  # keep=2: the steps before the NaN, nothing after


def test_a_checkpoint_without_the_skip_count_is_refused_by_name(tmp_path: Path) -> None:
    """Checkpoints from before the non-finite count was saved cannot resume exactly: say so."""
    _, go = toy_stage(tmp_path, nan_at=-1, cfg=CheckpointConfig(every=2))
    go()
    latest = tmp_path / "ckpt" / "stage_t" / (tmp_path / "ckpt" / "stage_t" / "latest").read_text().strip()
    state = load_checkpoint(latest)
    del state["objects"]["nonfinite"]
    torch.save(state, latest)
    with pytest.raises(CheckpointError, match=r"holds no \['nonfinite'\] \(written by an older wartok\)"):
        go()


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/wartok-pickle-payload-ran")


def test_a_checkpoint_carrying_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    MARKER.unlink(missing_ok=True)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"model": Payload()}, handle)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)
    saver = StageCheckpointer(tmp_path, "c", {}, keep=1)
    (tmp_path / "latest").write_text("evil.pt\n")
    with pytest.raises(CheckpointError):
        saver.load_latest()
    assert not MARKER.exists()


def test_checkpoint_settings_are_validated() -> None:
    from wartok.validate import ConfigError

    for kwargs, fragment in (({"every": -1}, "checkpoint.every"), ({"keep": 0}, "checkpoint.keep"),
                             ({"on_nonfinite": "ignore"}, "fail, skip")):
        with pytest.raises(ConfigError, match=fragment):
            CheckpointConfig(**kwargs)


class SignalsItself(torch.utils.data.Dataset):
    """Each item sends SIGUSR2 and SIGTERM to the process that loads it (a DataLoader worker)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)
        return i


def test_data_loader_workers_survive_the_stop_signals_the_main_process_handles() -> None:
    from torch.utils.data import DataLoader

    from wartok.runtime import ignore_stop_signals

    survived = DataLoader(SignalsItself(), batch_size=2, num_workers=1, worker_init_fn=ignore_stop_signals)
    assert torch.cat(list(survived)).tolist() == [0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="worker"):  # without it the signal kills the worker
        list(DataLoader(SignalsItself(), batch_size=2, num_workers=1))


def test_the_training_loaders_install_the_worker_signal_guard() -> None:
    from wartok.data import DataConfig, build_data
    from wartok.runtime import ignore_stop_signals

    bundle = build_data(DataConfig(num_workers=1, train_subset=64, heldout_subset=32), seed=0)
    assert bundle.train_loader.worker_init_fn is ignore_stop_signals
