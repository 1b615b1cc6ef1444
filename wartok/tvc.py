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
from wartok.validate import check_choice, check_finite

PRIOR_KINDS = ("none",)  # "ce" (joint) and "wgf" (wAR-Tok) arrive with the method stage


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
    """Posterior consistency: VQ codebook + beta * commitment (codebook term is 0 under EMA)."""

    enabled: bool = True
    weight: float = 1.0
    beta: float = 0.25

    def __post_init__(self) -> None:
        check_finite("tvc.posterior.weight", self.weight, minimum=0.0)
        check_finite("tvc.posterior.beta", self.beta, minimum=0.0)


@dataclass
class PriorTermConfig:
    """Prior consistency: `none` is the two-stage baseline (the tokenizer ignores the prior)."""

    kind: str = "none"
    weight: float = 0.0

    def __post_init__(self) -> None:
        check_choice("tvc.prior.kind", self.kind, PRIOR_KINDS)
        check_finite("tvc.prior.weight", self.weight, minimum=0.0)


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
    return {"codebook": quant.codebook_loss, "commitment": quant.commitment_loss}


def weigh(terms: dict[str, torch.Tensor], cfg: TVCConfig) -> torch.Tensor:
    """The total tokenizer loss: the only place where TVC weights are applied."""
    total = terms["l2"].new_zeros(())
    if cfg.likelihood.enabled:
        total = total + cfg.likelihood.weight * (terms["l2"] + cfg.likelihood.l1_weight * terms["l1"])
    if cfg.posterior.enabled:
        total = total + cfg.posterior.weight * (terms["codebook"] + cfg.posterior.beta * terms["commitment"])
    if cfg.prior.kind != "none":
        total = total + cfg.prior.weight * terms["prior"]
    return total
