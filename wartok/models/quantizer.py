"""Vector quantizer: codebook, assignment logits a_t(k), hard tokens, VQ losses, EMA upkeep.

Notation follows spec/METHOD.md: encoder output z_hat (B, T, d), codebook c (K, d),
assignment logits a_t(k) = -||z_hat_t - c_k||^2 / tau (cosine: <z_hat_t, c_k> / tau on
l2-normalised vectors), hard token h_t = argmax_k a_t(k), decoder input c[h_t] with the
straight-through estimator.

The module returns raw, unweighted loss terms; the weights (beta, ...) are applied by the one
loss module that owns them. Distances are computed in float32 with autocast disabled, because
nearest-code gaps are about 1% of the latent norm and bf16 would reorder them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from wartok.validate import ConfigError, check_choice, check_finite, check_int, check_unit_interval

LAPLACE_EPS = 1e-5  # additive smoothing of the EMA cluster sizes (VQ-VAE-2 / Sonnet value)


@dataclass
class QuantizerConfig:
    codebook_size: int = 256      # K >= 2
    dim: int = 32                 # d, must equal the tokenizer's latent dim (the tokenizer config validates)
    distance: str = "l2"          # "l2" (squared L2) | "cosine" (on l2-normalised vectors)
    tau: float = 1.0              # > 0, temperature of the assignment logits a_t(k)
    ema: bool = False             # EMA codebook updates instead of the codebook loss
    ema_decay: float = 0.99       # in [0, 1)
    dead_code_restart: bool = False
    dead_code_threshold: float = 0.01  # EMA cluster size below which a code is re-initialised from a random latent of the batch

    def __post_init__(self) -> None:
        self.validate("tokenizer.quantizer")

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming `prefix.<field>` for the first bad value."""
        check_int(f"{prefix}.codebook_size", self.codebook_size, 2)
        check_int(f"{prefix}.dim", self.dim, 1)
        check_choice(f"{prefix}.distance", self.distance, ["l2", "cosine"])
        check_finite(f"{prefix}.tau", self.tau, minimum=0.0, strict=True)
        for name in ("ema", "dead_code_restart"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{prefix}.{name}={getattr(self, name)!r} is not allowed; it must be true or false")
        check_unit_interval(f"{prefix}.ema_decay", self.ema_decay, open_right=True)
        check_finite(f"{prefix}.dead_code_threshold", self.dead_code_threshold, minimum=0.0)


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor        # (B, T, d) c[h] in value, identity gradient to z (straight-through)
    indices: torch.Tensor          # (B, T) long, hard tokens h_t = argmax_k a_t(k)
    assign_logits: torch.Tensor    # (B, T, K) a_t(k), differentiable w.r.t. z and the codebook
    codebook_loss: torch.Tensor    # () mean ||sg(z) - c[h]||^2 (zero when ema=True)
    commitment_loss: torch.Tensor  # () mean ||z - sg(c[h])||^2, raw (beta applied elsewhere)
    usage: torch.Tensor            # () fraction of the K codes hit in this batch
    perplexity: torch.Tensor       # () exp(entropy of this batch's code histogram)


def code_counts(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """(K,) float32 count of each code in `indices`. Not torch.bincount: on CUDA its output length
    depends on the largest index, which it reads back to the host, a sync in every training step."""
    flat = indices.reshape(-1)
    ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
    return torch.zeros(codebook_size, device=flat.device).index_add_(0, flat, ones)  # exact up to 2^24 per code


def code_histogram_stats(indices: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(usage, perplexity) of a tensor of code indices: fraction of codes hit, exp(entropy)."""
    counts = code_counts(indices, codebook_size)
    probs = counts / counts.sum().clamp_min(1.0)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum()  # 0 log 0 = 0
    return (counts > 0).float().mean(), entropy.exp()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with optional EMA codebook and dead-code restarts.

    State: `embedding` (K, d) is the raw codebook (a Parameter; frozen when ema=True, where the
    EMA rule moves it). `cluster_size` (K,) is the EMA count of latents per code; it is
    registered whatever the flags so that checkpoints load across stages with different flags.
    The EMA sum of latents per code is not stored: it equals embedding * smoothed(cluster_size)
    by construction, which keeps it consistent after restarts or when ema is switched on.
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        self.config = config
        K, d = config.codebook_size, config.dim
        # uniform(-1/K, 1/K) as in the VQ-VAE reference: small codes, latents pull them out
        self.embedding = nn.Parameter(torch.empty(K, d).uniform_(-1.0 / K, 1.0 / K))
        self.embedding.requires_grad_(not config.ema)
        # start at one latent per code so that restarts only hit codes that stay unused
        # for log(threshold)/log(decay) steps (about 460 at the defaults), not every code at step 1
        self.register_buffer("cluster_size", torch.ones(K))

    @property
    def codebook(self) -> torch.Tensor:
        """(K, d) code vectors as used for distances and fed to the decoder."""
        if self.config.distance == "cosine":
            return F.normalize(self.embedding, dim=-1)
        return self.embedding

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, T) long -> (B, T, d): the code vectors the decoder reads for these tokens."""
        return F.embedding(indices, self.codebook)

    def _prepare(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 latents and codebook in the space where distances are taken."""
        zf, c = z.float(), self.codebook.float()
        if self.config.distance == "cosine":
            zf = F.normalize(zf, dim=-1)
        if self.training and (self.config.ema or self.config.dead_code_restart):
            # the no_grad updates below write the Parameter in place; the graph must hold a copy
            c = c.clone()
        return zf, c

    def assignment_logits(self, zf: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """a_t(k) for float32 zf (B, T, d) and c (K, d) -> (B, T, K)."""
        if self.config.distance == "cosine":
            sim = zf @ c.t()  # (B, T, K)
        else:
            # -||z - c||^2 = -(|z|^2 - 2 z.c + |c|^2), expanded to avoid a (B, T, K, d) tensor
            sim = -(zf.pow(2).sum(-1, keepdim=True) - 2.0 * (zf @ c.t()) + c.pow(2).sum(-1))
        return sim / self.config.tau

    def similarity(self, z: torch.Tensor, detach_codebook: bool = False) -> torch.Tensor:
        """z (B, T, d) -> (B, T, K) float32 a_t(k) * tau: minus the squared L2 distance, or the
        cosine similarity. The prior terms form their own pi from it (their own temperature);
        detach_codebook keeps their gradient off the codebook."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf, c = z.float(), self.codebook.float()
            if self.config.distance == "cosine":
                zf = F.normalize(zf, dim=-1)
            if detach_codebook:
                c = c.detach()
            return self.assignment_logits(zf, c) * self.config.tau

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z: (B, T, d) encoder output -> QuantizerOutput (see its fields)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            zf, c = self._prepare(z)
            logits = self.assignment_logits(zf, c)  # (B, T, K)
            indices = logits.detach().argmax(dim=-1)  # (B, T)
            cq = F.embedding(indices, c)  # (B, T, d)
            # straight-through: the value is exactly c[h] (zf - sg(zf) is exactly 0, so indices ->
            # decode_indices reproduces the decoder's input bit for bit), the gradient is identity to z
            quantized = cq.detach() + (zf - zf.detach())
            commitment = F.mse_loss(zf, cq.detach())
            if self.config.ema:
                codebook_loss = zf.new_zeros(())
            else:
                codebook_loss = F.mse_loss(cq, zf.detach())
            usage, perplexity = code_histogram_stats(indices, self.config.codebook_size)
            if self.training and (self.config.ema or self.config.dead_code_restart):
                self._update(zf.detach().reshape(-1, zf.shape[-1]), indices.reshape(-1))
        return QuantizerOutput(quantized, indices, logits, codebook_loss, commitment, usage, perplexity)

    @torch.no_grad()
    def _update(self, flat_z: torch.Tensor, flat_idx: torch.Tensor) -> None:
        """EMA cluster sizes (and codebook when ema=True), then dead-code restarts.

        flat_z: (N, d) float32 latents in distance space, flat_idx: (N,) their codes.
        Under torch.distributed the batch statistics are summed over ranks and restarts are
        broadcast from rank 0, so every rank keeps the same codebook.
        """
        cfg = self.config
        K = cfg.codebook_size
        counts = code_counts(flat_idx, K)  # (K,)
        sums = torch.zeros(K, flat_z.shape[1], device=flat_z.device).index_add_(0, flat_idx, flat_z)  # (K, d)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        old_sum = self.embedding.float() * self._smoothed_sizes().unsqueeze(1)  # (K, d)
        self.cluster_size.mul_(cfg.ema_decay).add_(counts, alpha=1.0 - cfg.ema_decay)
        if cfg.ema:
            new_sum = old_sum * cfg.ema_decay + sums * (1.0 - cfg.ema_decay)
            self.embedding.copy_(new_sum / self._smoothed_sizes().unsqueeze(1))
        if cfg.dead_code_restart:
            self._restart_dead(flat_z)

    def _smoothed_sizes(self) -> torch.Tensor:
        """Laplace-smoothed cluster sizes (K,): never zero, same total as the raw sizes."""
        n = self.cluster_size.sum()
        K = self.config.codebook_size
        return (self.cluster_size + LAPLACE_EPS) / (n + K * LAPLACE_EPS) * n

    def _restart_dead(self, flat_z: torch.Tensor) -> None:
        """Re-initialise codes whose EMA cluster size fell below the threshold from latents of the
        batch: distinct latents while there are enough of them (cyclically after that).

        Fixed shapes throughout (a candidate for every code, kept only where the code is dead):
        selecting just the dead codes would need their count on the host, a device sync every
        step. The permutation is drawn every step, dead codes or not.
        """
        dead = self.cluster_size < self.config.dead_code_threshold  # (K,)
        perm = torch.randperm(flat_z.shape[0], device=flat_z.device)  # (N,)
        rank_among_dead = (dead.cumsum(0) - 1).clamp_min(0)  # (K,) 0, 1, ... over the dead codes
        candidates = flat_z[perm[rank_among_dead % flat_z.shape[0]]].to(self.embedding.dtype)  # (K, d)
        if _distributed():  # rank 0's choice, so every rank keeps the same codebook
            dist.broadcast(dead, src=0)
            dist.broadcast(candidates, src=0)
        self.embedding.copy_(torch.where(dead.unsqueeze(1), candidates, self.embedding))
        # the restarted code now holds about one latent; it must be used to stay alive
        restarted_size = max(1.0, self.config.dead_code_threshold)
        self.cluster_size.copy_(torch.where(dead, restarted_size, self.cluster_size))

    def extra_repr(self) -> str:
        c = self.config
        return f"K={c.codebook_size}, d={c.dim}, distance={c.distance}, tau={c.tau}, ema={c.ema}"

