"""The Tripartite Variational Consistency (TVC) terms, raw, and the one place that weighs them.

Every term function returns unweighted scalars; `weigh` is the only code that applies loss
weights, so a sweep over any weight reaches exactly one multiplication. Every raw term is
logged every step, also when its weight is zero, so a run shows the gaps it did not optimise.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from wartok.models.quantizer import QuantizerOutput
from wartok.tracker import TargetConfig, TrackerConfig
from wartok.validate import check_choice, check_finite, check_int

# The methods of METHOD.md and the prior-consistency term each one optimises.
PRIOR_KIND = {"two_stage": "none", "joint": "ce", "wartok": "wgf"}
METHODS = tuple(PRIOR_KIND)
TAU_MODES = ("relative", "absolute")
CE_INPUTS = ("st_onehot", "soft")


@dataclass
class LikelihoodConfig:
    """Conditional-likelihood consistency: L2 + l1_weight * L1 between image and reconstruction."""

    enabled: bool = True
    weight: float = 1.0
    l1_weight: float = 0.0

    def __post_init__(self) -> None:
        check_finite("tvc.likelihood.weight", self.weight, minimum=0.0)
        check_finite("tvc.likelihood.l1_weight", self.l1_weight, minimum=0.0)


@dataclass
class PosteriorConfig:
    """Posterior consistency: VQ codebook + beta * commitment (codebook term is 0 under EMA),
    optionally + entropy_weight * (mean per-token entropy of pi - entropy of the batch-mean pi):
    sharp assignments per token, diverse codes over the batch."""

    enabled: bool = True
    weight: float = 1.0
    beta: float = 0.25
    entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        check_finite("tvc.posterior.weight", self.weight, minimum=0.0)
        check_finite("tvc.posterior.beta", self.beta, minimum=0.0)
        check_finite("tvc.posterior.entropy_weight", self.entropy_weight, minimum=0.0)


@dataclass
class CEConfig:
    """The joint baseline's trainable AR prior (initialised from stage B's target)."""

    input: str = "st_onehot"       # st_onehot: straight-through one-hot embeddings | soft: embeddings of pi
    lr: float = 1.0e-4             # the AR prior's AdamW lr (the tokenizer keeps stage_c.optim.lr)

    def __post_init__(self) -> None:
        check_choice("tvc.prior.ce.input", self.input, CE_INPUTS)
        check_finite("tvc.prior.ce.lr", self.lr, minimum=0.0, strict=True)


@dataclass
class PriorTermConfig:
    """Prior consistency. Which term it is follows from `method`: two_stage has none, joint the
    AR cross-entropy (`ce`), wartok the WGF prior-matching signal (`wgf`, METHOD.md).

    The stabilising controls of METHOD.md are all here, so sweeps reach them. Their defaults
    are the stable setting of the CPU experiment recorded there (weight 0.01, slow tracker,
    no prior gradient into the codebook), plus clipping and centring of delta; see
    configs/config.yaml for the measurements behind them.
    """

    enabled: bool = True
    weight: float = 0.01
    warmup_steps: int = 0          # linear ramp of the weight from 0 over the first steps of stage C
    # shared by wgf and ce: how pi = softmax(a / tau) is formed for the prior term
    tau_mode: str = "relative"     # relative: tau * (median nearest-code gap of the batch) | absolute: tau
    tau: float = 1.0
    grad_to_codebook: bool = False  # False: the prior term's gradient reaches the encoder only
    # wgf only
    clip: float = 1.0              # clip delta to [-clip, clip] nats (0: off)
    center: bool = True            # subtract E_pi[delta] per position before clipping
    sub_batch: int = 0             # run the two AR passes on the first N images of the batch (0: all)
    every: int = 1                 # compute the signal every n-th tokenizer step
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    # ce only
    ce: CEConfig = field(default_factory=CEConfig)

    def __post_init__(self) -> None:
        check_finite("tvc.prior.weight", self.weight, minimum=0.0)
        check_int("tvc.prior.warmup_steps", self.warmup_steps, 0)
        check_choice("tvc.prior.tau_mode", self.tau_mode, TAU_MODES)
        check_finite("tvc.prior.tau", self.tau, minimum=0.0, strict=True)
        check_finite("tvc.prior.clip", self.clip, minimum=0.0)
        check_int("tvc.prior.sub_batch", self.sub_batch, 0)
        check_int("tvc.prior.every", self.every, 1)

    def weight_at(self, step: int) -> float:
        """The prior weight at stage-C step `step` (0-based), after the warm-up ramp."""
        if self.warmup_steps == 0:
            return self.weight
        return self.weight * min(1.0, (step + 1) / self.warmup_steps)


@dataclass
class TVCConfig:
    likelihood: LikelihoodConfig = field(default_factory=LikelihoodConfig)
    posterior: PosteriorConfig = field(default_factory=PosteriorConfig)
    prior: PriorTermConfig = field(default_factory=PriorTermConfig)


def likelihood_terms(images: torch.Tensor, recon: torch.Tensor) -> dict[str, torch.Tensor]:
    """Raw reconstruction terms, computed in float32 so bf16 autocast does not bias them."""
    images, recon = images.float(), recon.float()
    return {"l2": F.mse_loss(recon, images), "l1": F.l1_loss(recon, images)}


def posterior_terms(quant: QuantizerOutput) -> dict[str, torch.Tensor]:
    """Raw VQ terms and the two entropies of pi = softmax(a) (nats), computed in float32."""
    pi = quant.assign_logits.float().softmax(dim=-1)  # (B, T, K)
    token_entropy = -(pi * pi.clamp_min(1e-12).log()).sum(-1).mean()
    mean_pi = pi.flatten(0, 1).mean(0)  # (K,)
    batch_entropy = -(mean_pi * mean_pi.clamp_min(1e-12).log()).sum()
    return {"codebook": quant.codebook_loss, "commitment": quant.commitment_loss,
            "token_entropy": token_entropy, "batch_entropy": batch_entropy}


def weigh(terms: dict[str, torch.Tensor], cfg: TVCConfig, prior_weight: float = 0.0) -> torch.Tensor:
    """The total tokenizer loss: the only place where TVC weights are applied.

    `prior_weight` is the prior term's weight at this step (PriorTermConfig.weight_at: the
    ramp); the prior term is present in `terms` only under joint (`ce`) and wartok (`prior`).
    """
    total = terms["l2"].new_zeros(())
    if cfg.likelihood.enabled:
        total = total + cfg.likelihood.weight * (terms["l2"] + cfg.likelihood.l1_weight * terms["l1"])
    if cfg.posterior.enabled:
        post = cfg.posterior
        total = total + post.weight * (terms["codebook"] + post.beta * terms["commitment"])
        if post.entropy_weight > 0:
            total = total + post.weight * post.entropy_weight * (terms["token_entropy"] - terms["batch_entropy"])
    for name in ("prior", "ce"):
        if cfg.prior.enabled and name in terms:
            total = total + prior_weight * terms[name]
    return total
