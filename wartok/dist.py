"""Data-parallel training of one run over the GPUs of a node (DDP), or CPU processes with gloo.

Launch one process per GPU:
    torchrun --nproc_per_node 8 -m wartok.sweep experiment=cifar10
or, with the submitit SLURM launcher, one task per GPU (submitit starts them with srun, which
sets SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NUM_TASKS):
    python -m wartok.sweep -m experiment=cifar10 hydra/launcher=slurm_ddp_node   # tasks_per_node=8
    python -m wartok.sweep -m experiment=cifar10 hydra/launcher=slurm_gpu \
        hydra.launcher.tasks_per_node=8 hydra.launcher.gpus_per_node=8

What changes with world_size > 1 (everything else runs as in one process):
- `data.batch_size`, `stage_b.batch_size` and `stage_d.batch_size` stay the GLOBAL batch; rank r
  trains on the r-th contiguous slice of each global batch of the same seeded permutation
  (wartok/stream.py), so the ranks together see exactly the one-process batches.
- After backward the gradients are averaged over ranks (`average_gradients`). Each rank's loss
  is a mean over its equal-sized slice, so the average is the global batch's gradient for
  every loss that is a mean over samples. Batch statistics stay per rank: the optional
  batch-entropy term, tvc.prior.tau_mode=relative's median code gap, the logged usage and
  perplexity (the EMA codebook's counts are summed over ranks by the quantizer itself).
- Parameters start equal (same init seeds, then rank 0's are broadcast); after that each rank
  reseeds from the shared stream plus its rank, for random draws that must differ (dropout).
- Logged scalars are averaged over ranks; only rank 0 writes files (scalars, checkpoints,
  result.json, images, stage-cache entries). A checkpoint holds every rank's RNG state.
The stages' evaluation (token extraction, held-out NLL, PSNR) runs on every rank alike; the
rFID/gFID metrics and the image grids only on rank 0. All ranks use rank 0's run folder
(wartok/run.py); Hydra itself still writes `.hydra/` into each process's own folder.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as tdist

from wartok.runtime import seed_everything
from wartok.validate import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(env: Mapping[str, str] = os.environ) -> DistInfo:
    """Rank and world from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or from an srun job step
    (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID: what submitit's tasks see). Not from
    SLURM_NTASKS alone: an sbatch script's own shell also has SLURM_PROCID=0 and SLURM_NTASKS=n
    (checked on this project's local SLURM) and would wait forever for ranks that never start."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return DistInfo()


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """This rank's GPU: cuda:LOCAL_RANK, or cuda:0 when SLURM already limits each task to one GPU."""
    if device.type != "cuda" or info.world_size == 1:
        return device
    return torch.device("cuda", info.local_rank % max(torch.cuda.device_count(), 1))


def per_rank_batch(setting: str, batch_size: int, world: int) -> int:
    """A global batch setting's per-rank share; ConfigError naming the setting unless divisible."""
    if batch_size % world:
        nearest = batch_size - batch_size % world or world
        raise ConfigError(f"{setting}={batch_size} is not allowed with {world} processes; the global batch "
                          f"must be divisible by the number of processes (e.g. {nearest})")
    return batch_size // world


def init_distributed(device: torch.device, info: DistInfo) -> None:
    """Join the process group (nccl on CUDA, gloo on the CPU); nothing to do for one process."""
    if info.world_size == 1 or tdist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # srun sets no MASTER_ADDR/PORT: rank 0 runs on the node srun was started from (the batch
    # host), and the port follows from the job id, so concurrent jobs on one node differ.
    os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=info.rank, world_size=info.world_size,
                             device_id=device if device.type == "cuda" else None)


def cleanup() -> None:
    """Leave the process group. No barrier: rank 0 may still be measuring and writing, and the
    other ranks have nothing left to wait for."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


# ----------------------------------------------------------------------------- queries (1 process: rank 0 of 1)

def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


# ----------------------------------------------------------------------------- collectives (no-ops for 1 process)

def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Average each tensor over ranks in place, in one all-reduce of a flat float32 buffer."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    tdist.all_reduce(flat)
    flat /= world_size()
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.detach().copy_(part.view_as(t))


def all_reduce_mean(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scalars to log, averaged over ranks (the same keys in the same order on every rank)."""
    if world_size() == 1 or not values:
        return values
    stacked = torch.stack([v.detach().float() for v in values.values()])
    all_reduce_mean_([stacked])
    return dict(zip(values, stacked.unbind()))


def average_gradients(params: Sequence[torch.nn.Parameter], loss: torch.Tensor,
                      stop: bool) -> tuple[torch.Tensor, bool]:
    """Average the gradients over ranks, and in the same all-reduce the loss (so a non-finite
    loss on any rank is seen by all) and the stop request (a signal may reach ranks a step
    apart): every rank then skips, saves and stops at the same steps. Parameters without a
    gradient must be the same on every rank (they are: the step's code path depends on the
    step alone). Returns (mean loss, whether any rank was asked to stop)."""
    flags = torch.stack([loss.detach().float().reshape(()), loss.new_tensor(float(stop), dtype=torch.float32)])
    all_reduce_mean_([p.grad for p in params if p.grad is not None] + [flags])
    return flags[0], bool(flags[1] > 0)


def broadcast_(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    for t in tensors if world_size() > 1 else ():
        tdist.broadcast(t.detach(), src=src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's value of obj, on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order (keep tensors on the CPU)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_gather_cat(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Concatenate the ranks' tensors along dim 0, in rank order: per-rank batch slices give
    back the global batch."""
    if tensor is None or world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    tdist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


def seed_per_rank() -> None:
    """From here on each rank draws its own random numbers (dropout, CFG label drops): one seed
    drawn from the stream every rank shares (so it follows the stage seed), plus the rank."""
    if world_size() == 1:
        return
    base = int(torch.randint(2**31 - 1, ()))
    seed_everything(base + 7919 * rank())


def warn_main(message: str) -> None:
    if is_main():
        warnings.warn(message)
