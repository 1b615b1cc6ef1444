"""Static-shape GPT decoding, replayed as a CUDA graph on CUDA devices.

Decoding one token at a time is a long chain of small kernels, so on a GPU the CPU's kernel
launches, not the arithmetic, set the speed. A CUDA graph records the kernels of one step
once and then relaunches the whole step with a single call. A replay runs the same kernels
on the same memory, so the step must be static: fixed input/output buffers, a cache
allocated before capture, and no shape or Python branch that depends on the position.
`GPT.static_step` is written that way (the position is a 0-dim tensor, attention runs over
all block_size slots with a mask), and `StaticDecoder` owns the buffers it reads and writes.

On the CPU, or with use_graph=False, the decoder runs the same static-shape step eagerly, so
that path is exercised (and tested) without a GPU. The embedding lookup (sos/class row at
position 0, token row after) stays outside the graph: it is cheap and its branch on the
position is a Python one.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from wartok.models.gpt import GPT

WARMUP_STEPS = 3  # eager runs on a side stream before capture (PyTorch CUDA graphs docs)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of the autocast context active for device_type, or None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class StaticDecoder:
    """Feeds one position at a time through `GPT.static_step` with fixed buffers.

    Owns the input buffer x (B, 1, C) of input embeddings, the position pos (0-dim long
    tensor) and an allocated KVCache. `step(x_emb, pos)` copies its arguments into them and
    runs the step: on CUDA (use_graph=None or True) by replaying a CUDA graph captured on the
    first call, else eagerly. It returns logits (B, K) as a fresh tensor the caller owns (a
    clone of the graph's output buffer), so a later step never changes an earlier result.

    Positions must be fed in order 0, 1, 2, ... A new sequence may start again at 0 on the
    same decoder: slots after pos are masked and slot pos is written before it is read.
    The model must be in eval mode and must not move or reallocate its parameters while a
    captured graph is in use (the graph holds their addresses). Construct the decoder and call
    `step` under the same autocast context (the cache takes the autocast dtype); a graph is
    captured under that autocast with cache_enabled=False, as graph capture requires.
    """

    def __init__(self, model: GPT, batch_size: int, *, device: Optional[torch.device] = None,
                 use_graph: Optional[bool] = None):
        if model.training:
            raise ValueError("StaticDecoder needs the model in eval mode (dropout would make the step random)")
        weight = model.tok_emb.weight
        self.device = torch.device(device) if device is not None else weight.device
        self.use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise ValueError(f"use_graph=True needs a CUDA device, got {self.device}")
        self.model = model
        cache_dtype = _autocast_dtype(self.device.type) or weight.dtype
        self.cache = model.new_cache(batch_size).allocate(cache_dtype, self.device)
        self.x = torch.zeros(batch_size, 1, model.config.n_embd, dtype=weight.dtype, device=self.device)
        self.pos = torch.zeros((), dtype=torch.long, device=self.device)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None  # (B, K) graph output buffer, rewritten by each replay

    def _run(self) -> torch.Tensor:
        return self.model.static_step(self.x, self.cache, self.pos)  # (B, K)

    def _capture(self) -> None:
        """Warm up on a side stream, then record one step. The warm-up runs write the current
        position's keys/values, which the replay that follows rewrites with the same values."""
        amp = _autocast_dtype("cuda")
        ctx = (torch.autocast(device_type="cuda", dtype=amp, cache_enabled=False)
               if amp is not None else contextlib.nullcontext())
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with ctx, torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self._run()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with ctx, torch.cuda.graph(self.graph):
                self.logits = self._run()

    @torch.no_grad()
    def step(self, x_emb: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits (B, K) of the next token given input embeddings x_emb (B, 1, C) at position pos."""
        if not 0 <= pos < self.cache.shape[2]:
            raise ValueError(f"pos={pos} is outside the cache's {self.cache.shape[2]} positions")
        self.x.copy_(x_emb)
        self.pos.fill_(pos)
        if not self.use_graph:
            return self._run()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.logits.clone()
