"""Ancestral sampling of token sequences from a GPT prior (temperature, top-k, top-p, CFG).

Three ways to get each step's logits: a full forward over the prefix (use_kv_cache=False),
the dynamic KV cache (GPT.decode_step), or the static-shape decoder (cuda_graph=True: one
CUDA graph replay per step on CUDA, the same static-shape step run eagerly on the CPU; see
static_decode.py). Guidance, temperature, filtering and torch.multinomial run outside the
model step in the same order on every path, so for the same generator seed all three give
the same tokens up to float rounding of the probabilities.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from wartok.models.gpt import GPT
from wartok.models.static_decode import StaticDecoder


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits (N, K) outside the top-k / nucleus top-p set to -inf (0 / 1.0 = off)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass;
        # the most likely token is always kept
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _guided(logits: torch.Tensor, n: int, cfg_scale: float, guided: bool) -> torch.Tensor:
    """Rows [cond; null] (2N, K) -> u + s * (c - u) (N, K); identity without guidance."""
    if not guided:
        return logits
    c, u = logits[:n], logits[n:]
    return u + cfg_scale * (c - u)


def _stepper(model: GPT, rows: Optional[torch.Tensor], batch: int, out: torch.Tensor,
             use_kv_cache: bool, cuda_graph: bool) -> Callable[[int], torch.Tensor]:
    """A function t -> logits (batch, K) of position t once out[:, :t] holds the sampled tokens.
    With guidance (batch = 2N) the sampled rows are repeated for the null half."""
    reps = batch // out.shape[0]
    if cuda_graph:
        decoder = StaticDecoder(model, batch, device=out.device)

        def step(t: int) -> torch.Tensor:
            prev = torch.cat([out[:, t - 1]] * reps) if t > 0 else None  # (batch,)
            return decoder.step(model.step_inputs(prev, rows, batch, t), t)
    elif use_kv_cache:
        cache = model.new_cache(batch)

        def step(t: int) -> torch.Tensor:
            prev = torch.cat([out[:, t - 1]] * reps) if t > 0 else None  # (batch,)
            return model.decode_step(prev, rows, cache, t)
    else:
        def step(t: int) -> torch.Tensor:
            return model.next_logits(torch.cat([out[:, :t]] * reps), rows)  # prefix (batch, t)
    return step


@torch.no_grad()
def generate(model: GPT, num_samples: int, *, cond: Optional[torch.Tensor] = None, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, cfg_scale: float = 1.0, use_kv_cache: bool = True,
             cuda_graph: bool = False, generator: Optional[torch.Generator] = None,
             device: Optional[torch.device] = None) -> torch.Tensor:
    """Sample (num_samples, block_size) long token sequences.

    cond: (num_samples,) class labels for a class-conditional model, None = null class.
    cfg_scale != 1 needs a conditional model and cond; cond and null rows then run as one batch.
    cuda_graph=True (needs use_kv_cache=True) decodes through a StaticDecoder: a CUDA graph
    captured once per call on CUDA devices, the same static-shape step eagerly on the CPU.
    The model is put in eval mode for the call (no dropout, no label dropout) and restored after.
    """
    cfg = model.config
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
    if cuda_graph and not use_kv_cache:
        raise ValueError("cuda_graph=True needs use_kv_cache=True (the graph replays a static KV-cache step); "
                         "got use_kv_cache=False")
    guided = cfg_scale != 1.0
    if guided and (cfg.num_classes == 0 or cond is None):
        raise ValueError(f"cfg_scale={cfg_scale!r} needs a class-conditional model and cond")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    rows = cond.to(device) if cond is not None else None
    if rows is not None and rows.shape != (num_samples,):
        raise ValueError(f"cond must have shape ({num_samples},), got {tuple(rows.shape)}")
    if guided:
        rows = torch.cat([rows, torch.full_like(rows, cfg.num_classes)])  # (2N,) cond then null
    batch = 2 * num_samples if guided else num_samples

    was_training = model.training
    model.eval()
    try:
        out = torch.empty(num_samples, cfg.block_size, dtype=torch.long, device=device)
        step = _stepper(model, rows, batch, out, use_kv_cache, cuda_graph)
        for t in range(cfg.block_size):
            logits = step(t)  # (batch, K)
            logits = _guided(logits.float(), num_samples, cfg_scale, guided) / temperature  # (N, K)
            probs = filter_logits(logits, top_k, top_p).softmax(dim=-1)
            out[:, t] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    finally:
        model.train(was_training)
    return out
