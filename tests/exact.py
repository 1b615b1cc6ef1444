"""Exact AR models for problems small enough to enumerate (T <= 3 positions, K <= 5 codes).

`TabularAR` has the GPT's call contract (`forward(idx, cond=None, targets=None) -> (logits,
loss)`, a `config` with `num_classes`), so the WGF code runs on it unchanged, but its
conditionals are a table: row `prefix_index(h_<t)` holds log p(k | h_<t). `exact_kl` computes
KL(q || p) by enumerating all K^T sequences, differentiably in the assignment logits.
"""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F


def num_prefixes(K: int, T: int) -> int:
    return sum(K ** t for t in range(T))


def prefix_index(prefix: tuple[int, ...], K: int) -> int:
    """Rows: the empty prefix, then the K prefixes of length 1, then the K^2 of length 2, ..."""
    offset = sum(K ** t for t in range(len(prefix)))
    code = 0
    for k in prefix:
        code = code * K + k
    return offset + code


class TabularAR(nn.Module):
    def __init__(self, log_probs: torch.Tensor, K: int, T: int):
        super().__init__()
        assert log_probs.shape == (num_prefixes(K, T), K)
        self.table = nn.Parameter(log_probs.clone())
        self.K, self.T = K, T
        self.config = SimpleNamespace(num_classes=0, vocab_size=K, block_size=T)

    def forward(self, idx: torch.Tensor, cond=None, targets=None):
        B, T = idx.shape
        rows = torch.tensor([[prefix_index(tuple(idx[b, :t].tolist()), self.K) for t in range(T)] for b in range(B)])
        logits = self.table[rows]  # (B, T, K)
        loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def random_ar(K: int, T: int, generator: torch.Generator, sharpness: float = 1.5) -> TabularAR:
    logits = torch.randn(num_prefixes(K, T), K, generator=generator, dtype=torch.float64) * sharpness
    return TabularAR(logits.log_softmax(-1), K, T)


def sequences(K: int, T: int) -> torch.Tensor:
    """Every sequence of T codes: (K^T, T) long."""
    return torch.tensor(list(itertools.product(range(K), repeat=T)))


def aggregate_q(assign_logits: torch.Tensor) -> torch.Tensor:
    """q(z) = (1/N) sum_n prod_t pi_{n,t}(z_t) for every sequence z: (K^T,), from a (N, T, K)."""
    N, T, K = assign_logits.shape
    pi = assign_logits.softmax(-1)  # (N, T, K)
    z = sequences(K, T)  # (S, T)
    per_image = pi[:, torch.arange(T)[None, :], z].prod(-1)  # (N, S)
    return per_image.mean(0)


def sequence_log_p(model: TabularAR, z: torch.Tensor) -> torch.Tensor:
    """log p(z) = sum_t log p(z_t | z_<t) for every row of z (S, T)."""
    logits, _ = model(z)
    return logits.log_softmax(-1).gather(-1, z[..., None]).squeeze(-1).sum(-1)


def exact_kl(assign_logits: torch.Tensor, target: TabularAR) -> torch.Tensor:
    """KL(q || p) over all K^T sequences, differentiable w.r.t. the assignment logits."""
    N, T, K = assign_logits.shape
    q = aggregate_q(assign_logits)
    log_p = sequence_log_p(target, sequences(K, T)).detach()
    return (q * (q.clamp_min(1e-300).log() - log_p)).sum()


def exact_conditionals(assign_logits: torch.Tensor) -> TabularAR:
    """The tracker that equals q's exact conditionals q(k | h_<t) = q(h_<t, k) / q(h_<t)."""
    N, T, K = assign_logits.shape
    q = aggregate_q(assign_logits.detach()).reshape((K,) * T)  # q[z_1, ..., z_T]
    table = torch.empty(num_prefixes(K, T), K, dtype=q.dtype)
    for t in range(T):
        marginal = q.sum(dim=tuple(range(t + 1, T))) if t + 1 < T else q  # q(z_1..z_{t+1}), shape K^(t+1)
        for prefix in itertools.product(range(K), repeat=t):
            joint = marginal[prefix]  # (K,) q(prefix, k)
            table[prefix_index(prefix, K)] = (joint / joint.sum()).clamp_min(1e-300).log()
    return TabularAR(table, K, T)
