"""The entry point end to end on real Fashion-MNIST: the smoke run and the CLI's bad-input path."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wartok.results import read_result
from wartok.sweep import PROJECT_ROOT


def run_cli(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "wartok.sweep", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("smoke")
    proc = run_cli(["experiment=smoke", "device=cpu", f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_smoke_writes_a_schema_valid_result(smoke_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, proc = smoke_run
    result = read_result(out / "result.json")  # validates the schema
    assert result["status"] == "completed" and result["error"] is None
    assert result["method"] == "two_stage" and result["seed"] == 0
    assert result["config"]["tokenizer.quantizer.codebook_size"] == 32
    assert result["overrides"] == ["experiment=smoke", "device=cpu"]
    assert result["wall_seconds"] > 0 and result["versions"]["torch"].startswith("2.")
    metrics = result["metrics"]
    for name in ("ar_loss", "ar_loss_bits", "psnr", "codebook_usage", "token_perplexity"):
        assert math.isfinite(metrics[name]["value"]), name
    assert metrics["ar_loss"]["n"] == 256 * 64  # every held-out token counted
    assert metrics["ar_loss_bits"]["value"] == pytest.approx(metrics["ar_loss"]["value"] / math.log(2))
    assert 0 < metrics["ar_loss"]["value"] < math.log(32) * 1.5
    assert 0 < metrics["codebook_usage"]["value"] <= 1
    assert 1 <= metrics["token_perplexity"]["value"] <= 32
    assert 5 < metrics["psnr"]["value"] < 60
    for name, n in (("rfid", 64), ("rkid", 64), ("gfid", 64), ("gkid", 64)):
        entry = metrics[name]
        assert math.isfinite(entry["value"]) and entry["value"] > 0 and entry["n"] == n, name
        assert entry["extractor"] == "inception-v3-compat", name
        assert len(entry["weights_sha256"]) == 64 and entry["torch_fidelity"] == "0.4.0", name
    # FID under 2048 images is biased high and flagged; KID is unbiased, flagged only when its subset was clamped
    assert metrics["rfid"]["reliable"] is False and metrics["gfid"]["reliable"] is False
    assert metrics["rkid"]["reliable"] is True and metrics["rkid"]["subset_size"] == 32
    assert metrics["gfid"]["n_reference"] == 128 and metrics["rfid"]["n_reference"] == 64
    assert metrics["is"]["value"] is None and "logits" in metrics["is"]["reason"]  # the offline weights have none
    assert "(unreliable: n < 2048)" in proc.stdout
    for path in result["artifacts"].values():
        assert (out / path).is_file(), path
    assert "ar_loss" in proc.stdout and "result:" in proc.stdout


def test_smoke_logs_every_stage_to_scalars_jsonl(smoke_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    out, _ = smoke_run
    lines = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    assert {line["stage"] for line in lines} == {"a", "b", "c", "d"}
    tokenizer_lines = [line for line in lines if line["stage"] == "a"]
    assert [line["step"] for line in tokenizer_lines] == [10, 20, 30]
    for key in ("l2", "l1", "codebook", "commitment", "loss", "usage", "perplexity", "lr"):
        assert key in tokenizer_lines[0], key


@pytest.mark.parametrize(
    ("override", "fragment"),
    [("tokenizer.quantizer.codebook_size=1", "codebook_size"), ("data.root=/nope", "data.root=/nope")],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, override: str, fragment: str) -> None:
    out = tmp_path / "run"
    proc = run_cli(["experiment=smoke", override, f"hydra.run.dir={out}"])
    assert proc.returncode == 2
    error_lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(error_lines) == 1 and fragment in error_lines[0], proc.stderr
    assert not (out / "result.json").exists() and not (out / "checkpoints").exists()
    assert not (out / "scalars.jsonl").exists()
