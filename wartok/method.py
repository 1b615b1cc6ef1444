"""The prior-consistency terms of stage C: the joint baseline (`ce`) and wAR-Tok (`wgf`).

Each term object has one call contract, used by the tokenizer stage:
  terms(tokenizer, out, labels, step) -> {raw term and diagnostics}  (no AR model changes)
  after_step(step)                     -> {diagnostics}              (AR upkeep, e.g. refresh)
  param_groups()                       -> [(params, lr)] the stage optimizer must also train
  state_dict() / load_state_dict()     -> for exact resume
The raw terms are weighed in exactly one place, tvc.weigh.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F

from wartok.models.gpt import GPT
from wartok.tracker import TrackerTarget
from wartok.tvc import PRIOR_KIND, PriorTermConfig
from wartok.wgf import nearest_code_gap, prior_matching_loss, shape_contrast, teacher_forced_logits, token_contrast

def prior_assign_logits(tokenizer: torch.nn.Module, z_hat: torch.Tensor,
                        cfg: PriorTermConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior term's assignment logits a / tau_eff (B, T, K) and tau_eff ().

    tau_mode=relative sets tau_eff = tau * the batch's median gap between nearest and
    second-nearest code (detached): METHOD.md found the gaps to be about 1% of the latent norm,
    so an absolute tau = 1 makes pi a near-uniform blur and its gradient noise.
    """
    sim = tokenizer.quantizer.similarity(z_hat, detach_codebook=not cfg.grad_to_codebook)  # (B, T, K)
    if cfg.tau_mode == "relative":
        tau_eff = cfg.tau * nearest_code_gap(-sim).clamp_min(1e-12)
    else:
        tau_eff = sim.new_tensor(cfg.tau)
    return sim / tau_eff, tau_eff


def _cond(model: GPT, labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return labels if model.config.num_classes > 0 else None


class WGFTerm:
    """wAR-Tok's prior-matching signal (METHOD.md), with tracker q_phi and target p_theta."""

    def __init__(self, target: GPT, cfg: PriorTermConfig, seed: int, precision: str = "fp32"):
        self.cfg = cfg
        self.models = TrackerTarget(copy.deepcopy(target), cfg.tracker, cfg.target, seed, precision)
        self._last: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    def terms(self, tokenizer: torch.nn.Module, out: Any, labels: Optional[torch.Tensor],
              step: int) -> dict[str, torch.Tensor]:
        tokens = out.quant.indices.detach()  # (B, T) hard tokens h
        self._last = (tokens, labels)
        if step % self.cfg.every:
            return {}
        n = self.cfg.sub_batch or tokens.shape[0]
        h, lab = tokens[:n], None if labels is None else labels[:n]
        tracker, target = self.models.tracker, self.models.target
        tracker_logits = teacher_forced_logits(tracker, h, _cond(tracker, lab))  # (n, T, K)
        target_logits = teacher_forced_logits(target, h, _cond(target, lab))  # (n, T, K)
        delta = token_contrast(tracker_logits, target_logits)  # (n, T, K)
        assign, tau_eff = prior_assign_logits(tokenizer, out.z_hat[:n], self.cfg)
        pi = assign.softmax(dim=-1)
        shaped = shape_contrast(delta, pi, self.cfg.center, self.cfg.clip)
        return {
            "prior": prior_matching_loss(assign, shaped),
            # the loss value is ~0 once delta is centred; this is its uncentred value E_pi[delta]
            "prior_gap": (pi.detach() * delta).sum(-1).mean(),
            "delta_abs": (pi.detach() * delta.abs()).sum(-1).mean(),  # E_pi |delta|, nats
            "tracker_ce": F.cross_entropy(tracker_logits.flatten(0, 1), h.flatten()),
            "target_ce": F.cross_entropy(target_logits.flatten(0, 1), h.flatten()),
            "tau_eff": tau_eff.detach(),
        }

    def upkeep_batch(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The (tokens, labels) of the last step, which after_step trains the tracker/target on."""
        return self._last

    def after_step(self, step: int, batch: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
                   ) -> dict[str, torch.Tensor]:
        """Tracker/target upkeep on `batch` (default: this step's tokens; DDP passes the global batch)."""
        tokens, labels = batch or self._last
        return self.models.after_step(step, tokens, labels)

    def param_groups(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        return []  # the AR models have their own optimizers; none is trained by the tokenizer's loss

    def state_dict(self) -> dict[str, Any]:
        return self.models.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.models.load_state_dict(state)


class JointTerm:
    """The joint baseline: a trainable AR prior's next-token cross-entropy on the tokenizer's
    tokens, back-propagated into the AR and, through its input embeddings, into the encoder."""

    def __init__(self, target: GPT, cfg: PriorTermConfig):
        self.cfg = cfg
        self.prior = copy.deepcopy(target).requires_grad_(True).train()

    def terms(self, tokenizer: torch.nn.Module, out: Any, labels: Optional[torch.Tensor],
              step: int) -> dict[str, torch.Tensor]:
        tokens = out.quant.indices.detach()  # (B, T)
        assign, _ = prior_assign_logits(tokenizer, out.z_hat, self.cfg)
        pi = assign.softmax(dim=-1)  # (B, T, K)
        if self.cfg.ce.input == "st_onehot":
            one_hot = F.one_hot(tokens, pi.shape[-1]).to(pi.dtype)
            weights = one_hot + pi - pi.detach()  # value: one-hot of h; gradient: through pi
        else:
            weights = pi
        _, ce = self.prior(tokens, cond=_cond(self.prior, labels), targets=tokens, token_weights=weights)
        return {"ce": ce}

    def after_step(self, step: int) -> dict[str, torch.Tensor]:
        return {}

    def param_groups(self) -> list[tuple[list[torch.nn.Parameter], float]]:
        return [(list(self.prior.parameters()), self.cfg.ce.lr)]

    def state_dict(self) -> dict[str, Any]:
        return {"prior": self.prior.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prior.load_state_dict(state["prior"])


def build_prior_term(method: str, target: GPT, cfg: PriorTermConfig, seed: int, precision: str = "fp32"):
    """None for two_stage; else the method's term, built around a copy of stage B's target.
    precision: the run's (fp32 | bf16), for the AR training steps the term runs on its own."""
    kind = PRIOR_KIND[method]
    if kind == "wgf":
        return WGFTerm(target, cfg, seed, precision)
    if kind == "ce":
        return JointTerm(target, cfg)
    return None
