"""Stage D's measurements, identical for every method: held-out AR loss, PSNR, code usage, grids."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import save_image
from tqdm.auto import tqdm

from wartok.metrics import to_uint8
from wartok.models.sample import generate
from wartok.runtime import autocast


@torch.no_grad()
def heldout_nll(prior: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor, batch_size: int,
                device: torch.device) -> float:
    """Mean next-token negative log-likelihood over every held-out token, in nats/token (fp32)."""
    prior.eval()
    conditional = prior.config.num_classes > 0
    total, count = 0.0, 0
    for start in range(0, len(tokens), batch_size):
        batch = tokens[start:start + batch_size].to(device)  # (B, T)
        cond = labels[start:start + batch_size].to(device) if conditional else None
        logits, _ = prior(batch, cond=cond)  # (B, T, K)
        nll = F.cross_entropy(logits.float().flatten(0, 1), batch.flatten(), reduction="sum")
        total += nll.item()
        count += batch.numel()
    return total / count


def code_histogram_stats(tokens: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """codebook_usage: fraction of the K codes used; token_perplexity: exp(entropy) of the code histogram."""
    counts = torch.bincount(tokens.flatten(), minlength=codebook_size).double()
    probs = counts / counts.sum()
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum().item()
    return {"codebook_usage": (counts > 0).double().mean().item(), "token_perplexity": math.exp(entropy)}


@torch.no_grad()
def reconstruction_psnr(tokenizer: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                        precision: str) -> float:
    """Mean per-image PSNR (dB) of reconstructions, on images mapped from [-1, 1] to [0, 1]."""
    tokenizer.eval()
    psnrs = []
    for images, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        images = images.to(device)
        with autocast(device, precision):
            recon = tokenizer(images).recon
        mse = ((to_unit(recon.float()) - to_unit(images)) ** 2).flatten(1).mean(dim=1)  # (B,)
        psnrs.append(10.0 * torch.log10(1.0 / mse.clamp_min(1e-10)))
    return torch.cat(psnrs).mean().item()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


@torch.no_grad()
def save_reconstruction_grid(tokenizer: torch.nn.Module, dataset: Dataset, count: int, path: Path,
                             device: torch.device) -> Path:
    """Rows alternate originals and their reconstructions."""
    tokenizer.eval()
    images = torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))]).to(device)
    recon = tokenizer(images).recon.float()
    pairs = torch.stack([images, recon], dim=1).flatten(0, 1)  # (2N, C, H, W), original then reconstruction
    save_image(to_unit(pairs), path, nrow=16)
    return path


@torch.no_grad()
def save_sample_grid(tokenizer: torch.nn.Module, prior: torch.nn.Module, count: int, path: Path,
                     device: torch.device, temperature: float, top_k: int, top_p: float, seed: int,
                     cfg_scale: float = 1.0) -> Path:
    """Decoded samples of the evaluation prior (class-balanced labels when it is conditional)."""
    prior.eval()
    tokenizer.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = generate(prior, count, cond=balanced_labels(prior, 0, count, device), temperature=temperature,
                      top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, generator=generator, device=device)  # (N, T)
    save_image(to_unit(tokenizer.decode_indices(tokens).float()), path, nrow=8)
    return path


def balanced_labels(prior: torch.nn.Module, start: int, count: int, device: torch.device) -> torch.Tensor | None:
    """Labels of samples start..start+count-1 of a class-balanced set: sample i gets class
    i mod num_classes, so shards of a sharded gFID together hold the unsharded set's labels.
    None for an unconditional prior."""
    num_classes = prior.config.num_classes
    return torch.arange(start, start + count, device=device) % num_classes if num_classes > 0 else None


@torch.no_grad()
def reconstructions_uint8(tokenizer: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                          precision: str) -> torch.Tensor:
    """uint8 (N, 3, H, W) reconstructions of every image of `dataset`, in order."""
    tokenizer.eval()
    out = []
    for images, _ in tqdm(DataLoader(dataset, batch_size=batch_size, shuffle=False), desc="reconstructing for rFID",
                          disable=None, leave=False):
        with autocast(device, precision):
            out.append(to_uint8(tokenizer(images.to(device)).recon.float()))
    return torch.cat(out)


@torch.no_grad()
def samples_uint8(tokenizer: torch.nn.Module, prior: torch.nn.Module, count: int, batch_size: int,
                  device: torch.device, precision: str, temperature: float, top_k: int, top_p: float,
                  seed: int, cfg_scale: float = 1.0, start: int = 0, cuda_graph: bool = False) -> torch.Tensor:
    """uint8 (count, 3, H, W) decoded samples of the prior, class-balanced when it is conditional.

    `start` numbers the first sample (its label is start mod num_classes): a shard of a sharded
    gFID (wartok/fid_shards.py) draws samples start..start+count-1 of the whole set."""
    prior.eval()
    tokenizer.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    out = []
    for offset in tqdm(range(0, count, batch_size), desc="sampling for gFID", disable=None, leave=False):
        n = min(batch_size, count - offset)
        cond = balanced_labels(prior, start + offset, n, device)
        with autocast(device, precision):
            tokens = generate(prior, n, cond=cond, temperature=temperature, top_k=top_k, top_p=top_p,
                              cfg_scale=cfg_scale, cuda_graph=cuda_graph, generator=generator, device=device)  # (n, T)
            out.append(to_uint8(tokenizer.decode_indices(tokens).float()))
    return torch.cat(out)
