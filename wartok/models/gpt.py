"""GPT prior over image tokens (nanoGPT-style), unconditional or class-conditional.

Position t of the input holds [sos(cond), h_1, ..., h_{T-1}][t] and predicts h_t, so
`forward(idx)` returns p(h_t | h_<t, cond) for every t in one teacher-forced pass: all K logits
at every position, as evaluation and the WGF contrast need. sos is a row of a class-embedding
table with num_classes + 1 rows whose last row is the null (unconditional) class; with
num_classes = 0 it is a single learned start embedding.

Incremental decoding: `new_cache(batch)` gives a KVCache preallocated to block_size;
`decode_step(prev, cond, cache, pos)` feeds one position. Its shapes grow with pos (keys
[0, pos]), which is simplest on the CPU but cannot be replayed as a CUDA graph.

Static-shape decoding: `static_step(x, cache, pos)` takes pos as a 0-dim long tensor on the
model's device and a cache whose buffers were allocated up front (`KVCache.allocate`). Every
shape is independent of pos: keys/values go into slot pos of the full (B, nh, block_size, hs)
buffers with index_copy_, attention runs over all block_size slots with the mask slot <= pos,
and position tables are read with index_select. A CUDA graph replays fixed kernels on fixed
buffers, so nothing in the step may depend on pos through a shape, an allocation or a Python
branch on a tensor value; static_decode.py captures this step. Sampling lives in sample.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from wartok.validate import ConfigError, check_choice, check_int, check_unit_interval

ROPE_BASE = 10000.0  # RoPE frequency base (RoFormer / LLaMA value)


@dataclass
class GPTConfig:
    vocab_size: int = 256        # K (>= 2)
    block_size: int = 64         # T, tokens per sequence
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256            # divisible by n_head
    dropout: float = 0.0         # in [0, 1)
    pos: str = "learned"         # "learned" | "rope"
    num_classes: int = 0         # 0 = unconditional; else class-conditional with a null class for CFG
    cfg_dropout: float = 0.1     # prob. of replacing the label by the null class in training (only when num_classes > 0)
    bias: bool = False

    def __post_init__(self) -> None:
        self.validate("gpt")

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming `prefix.<field>` for the first bad value."""
        check_int(f"{prefix}.vocab_size", self.vocab_size, 2)
        check_int(f"{prefix}.block_size", self.block_size, 1)
        check_int(f"{prefix}.n_layer", self.n_layer, 1)
        check_int(f"{prefix}.n_head", self.n_head, 1)
        check_int(f"{prefix}.n_embd", self.n_embd, 1)
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"{prefix}.n_embd={self.n_embd!r} is not allowed; it must be divisible by {prefix}.n_head={self.n_head}")
        check_unit_interval(f"{prefix}.dropout", self.dropout, open_right=True)
        check_choice(f"{prefix}.pos", self.pos, ["learned", "rope"])
        if self.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise ConfigError(
                f"{prefix}.n_embd={self.n_embd!r} is not allowed with pos=rope; the head size "
                f"n_embd/n_head={self.n_embd // self.n_head} must be even")
        check_int(f"{prefix}.num_classes", self.num_classes, 0)
        check_unit_interval(f"{prefix}.cfg_dropout", self.cfg_dropout)
        if not isinstance(self.bias, bool):
            raise ConfigError(f"{prefix}.bias={self.bias!r} is not allowed; it must be true or false")


class KVCache:
    """Per-layer keys/values, preallocated to block_size.

    Dynamic use (`write`): storage is allocated on the first write of each layer, in the dtype
    of the incoming keys, so the cache follows autocast; `write` stores positions
    [start, start + T) and returns the keys/values of positions [0, start + T).

    Static use (`allocate`, then `write_at`): all layers are allocated and zeroed before the
    first step, because an allocation inside a captured CUDA graph would be replayed as a
    zero-fill on every step; `write_at` stores one position given as a tensor and returns the
    full buffers, so shapes never change.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, block_size: int, head_size: int):
        self.shape = (batch_size, n_head, block_size, head_size)
        self.k: list[Optional[torch.Tensor]] = [None] * n_layer
        self.v: list[Optional[torch.Tensor]] = [None] * n_layer
        self.slots: Optional[torch.Tensor] = None  # (block_size,) slot indices, set by allocate

    def allocate(self, dtype: torch.dtype, device: torch.device) -> "KVCache":
        """Allocate every layer now (zeros, `dtype` on `device`); returns self."""
        self.k = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in self.k]
        self.v = [torch.zeros(self.shape, dtype=dtype, device=device) for _ in self.v]
        self.slots = torch.arange(self.shape[2], device=device)
        return self

    def write_at(self, layer: int, pos: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, 1, hs) in slot pos (0-dim long tensor); returns the full buffers
        (B, nh, block_size, hs). Slots after pos hold stale or zero values: mask them."""
        self.k[layer].index_copy_(2, pos.view(1), k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, pos.view(1), v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is None:
            self.k[layer] = k.new_zeros(self.shape)
            self.v[layer] = v.new_zeros(self.shape)
        end = start + k.shape[2]
        if end > self.shape[2]:
            raise ValueError(f"KV cache holds {self.shape[2]} positions; asked to write up to {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, end, hs)


def rope_tables(block_size: int, head_size: int, base: float = ROPE_BASE) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables (block_size, head_size // 2) for rotary position embeddings."""
    inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.arange(block_size, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x1, x2) halves of the head dim; x (B, nh, T, hs), cos/sin (T, hs/2). float32 math."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.dropout = layer, config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        return tuple(t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                cache: Optional[KVCache], start: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self._qkv(x)  # (B, nh, T, hs)
        if rope is not None:
            cos, sin = rope[0][start:start + T], rope[1][start:start + T]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.write(self.layer, start, k, v)  # (B, nh, start + T, hs)
        mask, causal = None, True
        if start > 0:
            # queries sit at positions start..start+T-1 and may see keys 0..their own position
            causal = False
            if T > 1:
                q_pos = torch.arange(start, start + T, device=x.device)[:, None]
                mask = torch.arange(start + T, device=x.device)[None, :] <= q_pos  # (T, start + T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def forward_static(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
                       cache: KVCache, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One position x (B, 1, C) at pos (0-dim tensor); rope: cos/sin rows (1, hs/2) of pos;
        mask (1, block_size) True for slots <= pos. Shapes do not depend on pos."""
        B, T, C = x.shape
        q, k, v = self._qkv(x)  # (B, nh, 1, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k, v = cache.write_at(self.layer, pos, k, v)  # (B, nh, block_size, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)  # (B, nh, 1, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, 1, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope=None, cache=None, start: int = 0):
        x = x + self.attn(self.ln_1(x), rope, cache, start)
        return x + self.mlp(self.ln_2(x))

    def forward_static(self, x, rope, cache, pos, mask):
        x = x + self.attn.forward_static(self.ln_1(x), rope, cache, pos, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.cls_emb = nn.Embedding(config.num_classes + 1, config.n_embd)  # last row: null class / sos
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.pos == "rope":
            cos, sin = rope_tables(config.block_size, config.n_embd // config.n_head)
            # not persistent: derived from the config, so checkpoints stay independent of it
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # scaled residual projections (GPT-2)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _labels(self, cond: Optional[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
        """Class-table rows for the start token (B,): cond, or the null row; CFG dropout in training."""
        null = self.config.num_classes
        if cond is None:
            return torch.full((batch,), null, dtype=torch.long, device=device)
        if self.config.num_classes == 0:
            raise ValueError("cond was given to an unconditional GPT (num_classes=0)")
        if self.training and self.config.cfg_dropout > 0:
            drop = torch.rand(batch, device=device) < self.config.cfg_dropout
            cond = torch.where(drop, torch.full_like(cond, null), cond)
        return cond

    def _trunk(self, x: torch.Tensor, start: int, cache: Optional[KVCache]) -> torch.Tensor:
        """Input embeddings (B, T, C) at positions [start, start + T) -> logits (B, T, K)."""
        T = x.shape[1]
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} positions exceeds block_size={self.config.block_size}")
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=x.device))  # (B, T, C)
        rope = (self.rope_cos, self.rope_sin) if self.config.pos == "rope" else None
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, rope, cache, start)
        return self.lm_head(self.ln_f(x))  # (B, T, K)

    def _inputs(self, prefix: torch.Tensor, cond: Optional[torch.Tensor],
                prefix_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[sos(cond), emb(prefix)] -> (B, 1 + prefix length, C); prefix_weights (B, t, K), when
        given, replace the lookup by weights @ embedding table (soft or straight-through inputs)."""
        sos = self.cls_emb(self._labels(cond, prefix.shape[0], prefix.device))[:, None]  # (B, 1, C)
        if prefix_weights is None:
            emb = self.tok_emb(prefix)  # (B, t, C)
        else:
            emb = prefix_weights.to(self.tok_emb.weight.dtype) @ self.tok_emb.weight  # (B, t, K) @ (K, C)
        return torch.cat([sos, emb], dim=1)

    def forward(self, idx: torch.Tensor, cond: Optional[torch.Tensor] = None,
                targets: Optional[torch.Tensor] = None,
                token_weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """idx (B, T') tokens -> logits (B, T', K) of p(h_t | h_<t, cond) for every t, and the
        mean next-token cross-entropy in nats against targets (B, T') (-1 = ignore) if given.

        token_weights (B, T', K), optional: input embeddings as weights over the vocabulary in
        place of idx's one-hot rows, so a gradient reaches whoever produced them (the joint
        baseline feeds straight-through one-hots or soft assignments of its tokenizer)."""
        weights = None if token_weights is None else token_weights[:, :-1]
        logits = self._trunk(self._inputs(idx[:, :-1], cond, weights), 0, None)  # (B, T', K)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def next_logits(self, prefix: torch.Tensor, cond: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, K) of p(h_t | prefix, cond) for prefix (B, t), t >= 0, by a full forward."""
        return self._trunk(self._inputs(prefix, cond), 0, None)[:, -1]

    def new_cache(self, batch_size: int) -> KVCache:
        c = self.config
        return KVCache(c.n_layer, batch_size, c.n_head, c.block_size, c.n_embd // c.n_head)

    def decode_step(self, prev: Optional[torch.Tensor], cond: Optional[torch.Tensor],
                    cache: KVCache, pos: int) -> torch.Tensor:
        """Logits (B, K) of p(h_pos | h_<pos, cond), feeding one position through the cache.

        pos = 0 feeds sos(cond) (prev is ignored; B is the cache's batch size);
        pos > 0 feeds prev = h_{pos-1} (B,). Positions must be fed in order 0, 1, 2, ...
        """
        return self._trunk(self.step_inputs(prev, cond, cache.shape[0], pos), pos, cache)[:, -1]

    def step_inputs(self, prev: Optional[torch.Tensor], cond: Optional[torch.Tensor],
                    batch_size: int, pos: int) -> torch.Tensor:
        """Input embedding (B, 1, C) of position pos: sos(cond) at 0, else tok_emb(prev), prev (B,)."""
        if pos == 0:
            labels = self._labels(cond, batch_size, self.cls_emb.weight.device)
            return self.cls_emb(labels)[:, None]  # (B, 1, C)
        return self.tok_emb(prev)[:, None]  # (B, 1, C)

    def static_step(self, x: torch.Tensor, cache: KVCache, pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) for one input embedding x (B, 1, C) at position pos, a 0-dim long
        tensor on the model's device, through an allocated cache (`KVCache.allocate`).

        The same result as decode_step, but no shape, allocation size or branch depends on the
        value of pos, so the call can be captured once as a CUDA graph and replayed for every
        position (see static_decode.py). Positions must be fed in order 0, 1, 2, ...
        """
        if cache.slots is None:
            raise RuntimeError("static_step needs a cache allocated with KVCache.allocate(dtype, device)")
        idx = pos.view(1)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight.index_select(0, idx)  # (B, 1, C) + (1, C)
        rope = None
        if self.config.pos == "rope":
            rope = (self.rope_cos.index_select(0, idx), self.rope_sin.index_select(0, idx))  # (1, hs/2) each
        mask = (cache.slots <= pos)[None]  # (1, block_size): the query sees the filled slots 0..pos
        x = self.drop(x)
        for block in self.blocks:
            x = block.forward_static(x, rope, cache, pos, mask)
        return self.lm_head(self.ln_f(x))[:, -1]  # (B, K)


def _preset(n_layer: int, n_head: int, n_embd: int) -> Callable[..., GPTConfig]:
    def make(vocab_size: int, block_size: int, num_classes: int = 0) -> GPTConfig:
        return GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                         n_embd=n_embd, num_classes=num_classes)
    return make


PRESETS: Dict[str, Callable[..., GPTConfig]] = {
    "tiny": _preset(2, 2, 64),     # tests
    "small": _preset(4, 4, 256),   # CPU experiments
    "base": _preset(12, 12, 768),  # GPT-B scale
    "large": _preset(24, 16, 1024),  # GPT-L scale (LlamaGen's GPT-L width and depth): `prior=gpt_large`
}


def gpt_config(size: str, vocab_size: int, block_size: int, num_classes: int = 0) -> GPTConfig:
    """A fresh config of a named size ("tiny", "small", "base", "large") for a given token space."""
    check_choice("gpt.size", size, PRESETS)
    return PRESETS[size](vocab_size, block_size, num_classes)
