"""Stages A and B are content-addressed and reused: across stage-C settings, and by concurrent jobs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from wartok.cache import StageCache, stage_key
from wartok.checkpoint import CheckpointError
from wartok.results import read_result
from wartok.sweep import PROJECT_ROOT

# the smoke experiment, shrunk further: these tests are about the cache, not the numbers
SMOKE = ["experiment=smoke", "device=cpu", "stage_a.steps=4", "stage_b.steps=2", "stage_c.steps=2", "stage_d.steps=2",
         "data.train_subset=128", "data.heldout_subset=64", "eval.num_grid_images=4", "metrics.enabled=false"]


def start_run(out: Path, cache: Path, *overrides: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "wartok.sweep", *SMOKE, f"cache_dir={cache}", f"hydra.run.dir={out}", *overrides]
    return subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]


def provenance(out: Path) -> dict:
    return read_result(out / "result.json")["stage_cache"]


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def test_a_changed_stage_c_setting_reuses_a_and_b(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    finish(start_run(tmp_path / "first", cache, "method=wartok", "tvc.prior.weight=0.01"))
    first = provenance(tmp_path / "first")
    assert not first["a"]["reused"] and not first["b"]["reused"]
    built = {name: (Path(p["folder"]) / "meta.json").stat().st_mtime_ns for name, p in first.items()}
    finish(start_run(tmp_path / "second", cache, "method=wartok", "tvc.prior.weight=0.1"))
    second = provenance(tmp_path / "second")
    assert second["a"]["reused"] and second["b"]["reused"]
    assert {name: p["key"] for name, p in second.items()} == {name: p["key"] for name, p in first.items()}
    assert {name: (Path(p["folder"]) / "meta.json").stat().st_mtime_ns for name, p in second.items()} == built
    assert len(entries(cache)) == 2
    # the reused run still carries stage A and B curves in its own scalars.jsonl
    stages = {json.loads(line)["stage"] for line in (tmp_path / "second" / "scalars.jsonl").read_text().splitlines()}
    assert stages == {"a", "b", "c", "d"}
    # a stage-A setting gives a new key for A, and so for B
    finish(start_run(tmp_path / "third", cache, "stage_a.steps=5"))
    third = provenance(tmp_path / "third")
    assert not third["a"]["reused"] and third["a"]["key"] != first["a"]["key"]
    assert len(entries(cache)) == 4


def test_concurrent_jobs_train_a_shared_stage_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    procs = [start_run(tmp_path / f"job{i}", cache, f"tvc.prior.weight={w}", "method=wartok")
             for i, w in enumerate((0.01, 0.02))]
    for proc in procs:
        finish(proc)
    runs = [provenance(tmp_path / f"job{i}") for i in range(2)]
    assert sorted(run["a"]["reused"] for run in runs) == [False, True]
    assert sorted(run["b"]["reused"] for run in runs) == [False, True]
    assert len(entries(cache)) == 2 and not list(cache.glob(".*tmp*"))


def test_a_corrupt_entry_is_rebuilt_with_a_warning(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    key = stage_key("a", {"x": 1})

    def build(folder: Path) -> None:
        (folder / "value.txt").write_text("42")

    def load(folder: Path) -> int:
        text = (folder / "value.txt").read_text()
        if not text.isdigit():
            raise CheckpointError(f"{folder} is corrupt")
        return int(text)

    assert cache.get_or_build(key, {"x": 1}, build, load)[0] == 42
    (tmp_path / key / "value.txt").write_text("garbage")
    with pytest.warns(UserWarning, match="corrupt"):
        value, hit = cache.get_or_build(key, {"x": 1}, build, load)
    assert value == 42 and not hit.reused
    assert len(list(tmp_path.glob(f"{key}.corrupt-*"))) == 1


def test_a_corrupt_tokenizer_checkpoint_is_rebuilt_not_a_crash(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    finish(start_run(tmp_path / "first", cache))
    folder = Path(provenance(tmp_path / "first")["a"]["folder"])
    (folder / "tokenizer.pt").write_bytes(b"not a checkpoint")
    proc = start_run(tmp_path / "second", cache)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "corrupt" in err and "Traceback" not in err
    assert not provenance(tmp_path / "second")["a"]["reused"]
