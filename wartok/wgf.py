"""The wAR-Tok prior-matching signal (METHOD.md): token contrast and its loss, as pure functions.

    delta_t(k) = log q_phi(k | h_<t) - log p_theta(k | h_<t)          (token_contrast)
    L_prior    = mean_b (1/T) sum_t sum_k pi_t(k) * stopgrad(delta_t(k))  (prior_matching_loss)

Both AR models run teacher-forced on the batch's hard tokens under no_grad, so the only
backward pass is through the tokenizer's soft assignments pi = softmax(a). The stabilising
controls METHOD.md asks for (per-position centring, clipping, the temperature of pi, whether
the codebook receives the gradient) are arguments here and config options in `WGFConfig`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_contrast(tracker_logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """(B, T, K) logits of q_phi and p_theta at every position -> delta (B, T, K) in nats, float32."""
    if tracker_logits.shape != target_logits.shape:
        raise ValueError(f"tracker logits {tuple(tracker_logits.shape)} and target logits "
                         f"{tuple(target_logits.shape)} must have the same shape")
    return (F.log_softmax(_at_least_fp32(tracker_logits), dim=-1)
            - F.log_softmax(_at_least_fp32(target_logits), dim=-1))


def shape_contrast(delta: torch.Tensor, pi: torch.Tensor, center: bool, clip: float) -> torch.Tensor:
    """Optional per-position centring, then clipping to [-clip, clip] (clip <= 0: off).

    Centring subtracts E_{pi_t}[delta_t] at each position. On its own it leaves the gradient of
    the loss unchanged (softmax is shift-invariant); it matters with clipping, which then
    clips around the current expectation instead of around zero.
    """
    if center:
        delta = delta - (pi.detach() * delta).sum(-1, keepdim=True)  # (B, T, K)
    if clip > 0:
        delta = delta.clamp(-clip, clip)
    return delta


def prior_matching_loss(assign_logits: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """mean over batch and positions of sum_k softmax(assign_logits)_t(k) * stopgrad(delta_t(k)).

    assign_logits: (B, T, K) a_t(k), differentiable w.r.t. the tokenizer; delta: (B, T, K).
    The gradient w.r.t. a_t(k) is pi_t(k) * (delta_t(k) - E_{pi_t}[delta_t]) / (B * T).
    """
    pi = _at_least_fp32(assign_logits).softmax(dim=-1)  # (B, T, K)
    return (pi * delta.detach()).sum(dim=-1).mean()


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """float32 under bf16 autocast; float64 stays float64 (exact checks in the tests)."""
    return x if x.dtype == torch.float64 else x.float()


def nearest_code_gap(sq_dist: torch.Tensor) -> torch.Tensor:
    """Median over tokens of (second-nearest - nearest) distance, from distances (B, T, K) -> ()."""
    two = sq_dist.detach().topk(2, dim=-1, largest=False).values  # (B, T, 2)
    return (two[..., 1] - two[..., 0]).median()


def teacher_forced_logits(model: torch.nn.Module, tokens: torch.Tensor,
                          cond: torch.Tensor | None = None) -> torch.Tensor:
    """All K logits at every position of the hard tokens (B, T), with no autograd graph."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits, _ = model(tokens, cond=cond)  # (B, T, K)
    finally:
        model.train(was_training)
    return logits.clone()  # out of inference mode, so autograd may read it as a constant
