"""Data-parallel runs (wartok/dist.py) on the CPU: 2 gloo processes against 1, same global batch.

The end-to-end test runs the real entry point under `python -m torch.distributed.run
--nproc_per_node 2` (the torchrun path: RANK/WORLD_SIZE from the environment), with every
pipeline stage (A and B through the stage cache, C with the wartok method, D), and one process
with the same settings. The loss curves agree to rtol 1e-4, not bit for bit: with 2 ranks each
gradient is two half-batch means summed by the all-reduce and halved, and each kernel reduces
over a batch of 16 instead of 32, so float32 additions happen in another order (~1e-7 relative
per step, which Adam carries on; measured here over these 20 steps: at most 1.5e-7 on `loss`,
6e-6 on `prior_gap`; the centred `prior` term is ~1e-8 in absolute value, hence abs=1e-7). Rank 1 runs under an audit hook that records every file it
opens for writing, creates, renames or removes from the moment wartok's `execute` starts:
there must be none (Hydra's own `.hydra/` files, written before, are the entry point's concern).
A third 2-process run is killed after a stage-C checkpoint and rerun: it must end bit-equal to
the uninterrupted 2-process run.

Settings the test avoids because they are batch statistics, which a rank computes over its own
slice (so they are not the one-process values, by design): tvc.prior.tau_mode=relative (the
batch's median code gap), the batch-entropy term, dead-code restarts, and `usage`/`perplexity`/
`tau_eff` in the logged scalars (averaged over ranks, not recomputed on the global batch).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from test_reliability import FAULTS, assert_bit_equal, final_states
from wartok.data import DataConfig, build_data
from wartok.dist import DistInfo, detect, per_rank_batch
from wartok.results import read_result
from wartok.stream import BatchStream, EpochSampler, shard
from wartok.sweep import PROJECT_ROOT
from wartok.validate import ConfigError

HERE = Path(__file__).resolve()
RUN = ["experiment=smoke", "device=cpu", "method=wartok", "metrics.enabled=false", "eval.num_grid_images=4",
       "data.train_subset=256", "data.heldout_subset=64", "data.batch_size=32",
       "stage_a.steps=8", "stage_b.steps=4", "stage_c.steps=4", "stage_d.steps=4",
       "stage_a.log_every=1", "stage_b.log_every=1", "stage_c.log_every=1", "stage_d.log_every=1",
       "stage_b.batch_size=32", "stage_d.batch_size=32", "checkpoint.every=3",
       "tvc.prior.tau_mode=absolute", "tvc.prior.tracker.lr=1e-3"]
COMPARED = ("loss", "l2", "commitment", "prior", "prior_gap", "tracker_ce", "target_ce", "tracker_refresh_ce",
            "grad_norm", "lr")
RTOL = 1e-4


# ----------------------------------------------------------------------------- the sampler's slices

def _loader(size: int, batch: int, seed: int = 3) -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(size)), batch_size=batch, sampler=EpochSampler(size, seed),
                      drop_last=True)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_slices_are_disjoint_and_make_up_the_global_batch(world: int) -> None:
    size, batch = 50, 8  # 6 global batches an epoch (2 images dropped); 20 steps cross 3 epochs
    single = BatchStream(_loader(size, batch), seed=5)
    ranks = [BatchStream(shard(_loader(size, batch), r, world), seed=5) for r in range(world)]
    for _ in range(20):
        (expected,) = next(single)
        parts = [next(stream)[0] for stream in ranks]
        assert all(len(p) == batch // world for p in parts)
        assert torch.equal(torch.cat(parts), expected)  # rank order = the global batch's order, so disjoint too
    assert {s.state_dict()["epoch"] for s in ranks} == {single.state_dict()["epoch"]} == {3}
    assert len(ranks[0].loader) == len(single.loader) == 6


def test_a_rank_resumes_mid_epoch_at_the_same_global_position() -> None:
    straight = BatchStream(shard(_loader(50, 8), 1, 2), seed=5)
    first = [next(straight)[0] for _ in range(9)]
    resumed = BatchStream(shard(_loader(50, 8), 1, 2), seed=5)
    for _ in range(4):
        next(resumed)
    state = resumed.state_dict()
    resumed = BatchStream(shard(_loader(50, 8), 1, 2), seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(next(resumed)[0], batch) for batch in first[4:])


def test_a_global_batch_not_divisible_by_the_processes_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.batch_size=30 is not allowed with 4 processes"):
        build_data(DataConfig(batch_size=30), seed=0, world=4)  # before looking for the data
    assert per_rank_batch("stage_b.batch_size", 64, 4) == 16


def test_rank_and_world_come_from_torchrun_or_an_srun_step() -> None:
    assert detect({}) == DistInfo()
    assert detect({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}) == DistInfo(3, 8, 3)
    assert detect({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}) == DistInfo(5, 8, 1)
    # an sbatch script's own shell: SLURM_PROCID=0 and SLURM_NTASKS=8 but no step of 8 tasks
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_LOCALID": "0"}) == DistInfo()


# ----------------------------------------------------------------------------- 2 processes against 1

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _run(args: list[str], out: Path, cache: Path, script: Path = HERE, **env_extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS"):
        env.pop(key, None)
    # each process names its own run folder, as Hydra's timestamps may under torchrun; rank 0's is the run's
    cmd = [*args, str(script), *RUN, f"cache_dir={cache}", f"hydra.run.dir='{out}/rank${{oc.env:RANK,0}}'"]
    return subprocess.run(cmd, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)


def _curves(out: Path) -> dict[tuple[str, int], dict[str, float]]:
    lines = [json.loads(line) for line in (out / "scalars.jsonl").read_text().splitlines()]
    return {(line["stage"], line["step"]): line for line in lines}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    procs = {"ddp": _run(TORCHRUN, root / "ddp", root / "cache_ddp", WARTOK_WRITE_AUDIT=str(root / "audit_ddp")),
             "single": _run([sys.executable], root / "single", root / "cache_single",
                            WARTOK_WRITE_AUDIT=str(root / "audit_single"))}
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stderr[-4000:]}"
    return {"root": root, "ddp": root / "ddp", "single": root / "single"}


def test_two_processes_give_the_one_process_loss_curves(runs: dict[str, Path]) -> None:
    ddp, single = _curves(runs["ddp"] / "rank0"), _curves(runs["single"] / "rank0")
    assert ddp.keys() == single.keys()
    assert {stage for stage, _ in ddp} == {"a", "b", "c", "d"} and len(ddp) == 8 + 4 + 4 + 4
    for where, line in single.items():
        for key in COMPARED:
            if key in line:
                assert ddp[where][key] == pytest.approx(line[key], rel=RTOL, abs=1e-7), (where, key)
    metrics_ddp = read_result(runs["ddp"] / "rank0" / "result.json")["metrics"]
    metrics_single = read_result(runs["single"] / "rank0" / "result.json")["metrics"]
    for name in ("ar_loss", "psnr", "target_ar_loss_stage_a_tokens"):
        assert metrics_ddp[name]["value"] == pytest.approx(metrics_single[name]["value"], rel=1e-3), name


def test_only_rank_0_writes(runs: dict[str, Path]) -> None:
    root, ddp = runs["root"], runs["ddp"]
    assert json.loads((root / "audit_ddp.1.json").read_text()) == []
    assert json.loads((root / "audit_ddp.0.json").read_text())  # the hook works: rank 0 did write
    assert not [p for p in (ddp / "rank1").rglob("*") if ".hydra" not in p.parts and p.suffix != ".log"]
    result = read_result(ddp / "rank0" / "result.json")
    assert result["status"] == "completed" and result["stage_cache"]["a"]["reused"] is False
    state = torch.load(ddp / "rank0" / "checkpoints" / "stage_c" / "step_00000004.pt", weights_only=True)
    assert len(state["ranks"]) == 2  # each rank's RNG state, for an exact resume
    assert [p.name for p in (root / "cache_ddp").iterdir() if p.is_dir()] and not list(
        (root / "cache_ddp").glob(".*tmp-*"))


def test_a_killed_two_process_run_resumes_bit_for_bit(runs: dict[str, Path]) -> None:
    """SIGKILL of rank 0 right after its stage-C checkpoint (torchrun then stops rank 1), rerun:
    the same final states, curves and metrics as the uninterrupted 2-process run, bit for bit
    (each rank restores its own RNG state; stages A and B come from the cache both times)."""
    root, out = runs["root"], runs["root"] / "killed"
    faults = {"WARTOK_FAULTS": "kill:c:3", "WARTOK_FAULT_MARKS": str(root)}
    assert _run(TORCHRUN, out, root / "cache_ddp", FAULTS, **faults).returncode != 0
    assert (out / "rank0" / "checkpoints" / "stage_c" / "latest").read_text().strip() == "step_00000003.pt"
    assert not (out / "rank0" / "result.json").exists()
    proc = _run(TORCHRUN, out, root / "cache_ddp", FAULTS, **faults)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed, reference = out / "rank0", runs["ddp"] / "rank0"
    assert_bit_equal(final_states(resumed), final_states(reference))
    assert (resumed / "scalars.jsonl").read_text() == (reference / "scalars.jsonl").read_text()
    assert_bit_equal(read_result(resumed / "result.json")["metrics"], read_result(reference / "result.json")["metrics"])


# ----------------------------------------------------------------------------- the audited entry point

def _audit_writes(audit: dict) -> None:
    """While audit["on"], record this process's file writes (open for writing, create, rename,
    remove) into audit["writes"]."""
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    events = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.symlink", "os.link",
              "shutil.rmtree", "tempfile.mkstemp", "tempfile.mkdtemp"}

    def hook(event: str, args: tuple) -> None:
        if not audit["on"]:
            return
        if event == "open" and not isinstance(args[0], int):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & write_flags:
                audit["writes"].append(f"open {args[0]}")
        elif event in events and not (event == "os.mkdir" and os.path.isdir(args[0])):  # makedirs(exist_ok)
            audit["writes"].append(f"{event} {args[0]}")

    sys.addaudithook(hook)


if __name__ == "__main__":
    # python tests/test_ddp.py ARGS: `python -m wartok.sweep ARGS`, recording every file write of
    # wartok's execute() into $WARTOK_WRITE_AUDIT.<rank>.json
    import wartok.sweep as sweep

    audit = {"on": False, "writes": []}
    _audit_writes(audit)
    execute = sweep.execute

    def audited(*args, **kwargs):
        audit["on"] = True
        try:
            return execute(*args, **kwargs)
        finally:
            audit["on"] = False
            report = Path(f"{os.environ['WARTOK_WRITE_AUDIT']}.{os.environ.get('RANK', '0')}.json")
            report.write_text(json.dumps(audit["writes"]))

    sweep.execute = audited
    sys.argv = ["wartok.sweep", *sys.argv[1:]]
    sweep.main()
