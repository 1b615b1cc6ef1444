"""Convolutional VQ tokenizer: image (B, C, H, W) <-> T = (H/downsample)^2 tokens in raster order.

Encoder: conv in, per resolution level `num_res_blocks` residual blocks, a stride-2 conv
between levels, then GroupNorm + SiLU + 1x1 conv to latent_dim. The decoder mirrors it with
nearest-neighbour upsampling + conv. The decoder output is unbounded (no tanh): it is trained
against images scaled to [-1, 1], so it lands in [-1, 1] up to reconstruction error; clamp
before saving or computing FID.

API (LlamaGen-like): encode -> z_hat (B, T, d), quantize -> QuantizerOutput,
decode(quantized), decode_indices(indices) for an AR prior's samples, forward -> TokenizerOutput.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List

import torch
import torch.nn as nn
import torch.nn.functional as F

from wartok.models.quantizer import QuantizerConfig, QuantizerOutput, VectorQuantizer
from wartok.validate import ConfigError, check_choice, check_int


@dataclass
class ConvTokenizerConfig:
    name: str = "conv"            # registry name; the only allowed value here is "conv"
    image_size: int = 32
    in_channels: int = 3
    downsample: int = 4           # power of two >= 1; image_size must be divisible by it
    channels: List[int] = field(default_factory=lambda: [64, 128, 128])  # width per level; len == log2(downsample) + 1
    num_res_blocks: int = 1
    latent_dim: int = 32
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    @property
    def num_tokens(self) -> int:
        """T = (image_size / downsample)^2, the prior's sequence length."""
        return (self.image_size // self.downsample) ** 2

    def __post_init__(self) -> None:
        # accept plain containers (e.g. from a YAML loader) for the nested fields
        if isinstance(self.quantizer, dict):
            self.quantizer = QuantizerConfig(**self.quantizer)
        self.channels = list(self.channels)
        self.validate("tokenizer")

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming `prefix.<field>` for the first bad value."""
        check_choice(f"{prefix}.name", self.name, ["conv"])
        check_int(f"{prefix}.image_size", self.image_size, 1)
        check_int(f"{prefix}.in_channels", self.in_channels, 1)
        check_int(f"{prefix}.downsample", self.downsample, 1)
        if self.downsample & (self.downsample - 1):
            raise ConfigError(f"{prefix}.downsample={self.downsample!r} is not allowed; it must be a power of two (1, 2, 4, 8, ...)")
        if self.image_size % self.downsample:
            raise ConfigError(
                f"{prefix}.image_size={self.image_size!r} is not allowed with {prefix}.downsample={self.downsample}; "
                f"it must be a multiple of {self.downsample}")
        levels = int(math.log2(self.downsample)) + 1
        if len(self.channels) != levels:
            raise ConfigError(
                f"{prefix}.channels={self.channels!r} is not allowed; it needs one width per resolution level: "
                f"{levels} entries for downsample={self.downsample}")
        for i, ch in enumerate(self.channels):
            check_int(f"{prefix}.channels[{i}]", ch, 1)
        check_int(f"{prefix}.num_res_blocks", self.num_res_blocks, 0)
        check_int(f"{prefix}.latent_dim", self.latent_dim, 1)
        if not isinstance(self.quantizer, QuantizerConfig):
            raise ConfigError(f"{prefix}.quantizer={self.quantizer!r} is not allowed; it must be a QuantizerConfig")
        self.quantizer.validate(f"{prefix}.quantizer")
        if self.quantizer.dim != self.latent_dim:
            raise ConfigError(
                f"{prefix}.quantizer.dim={self.quantizer.dim!r} is not allowed; it must equal "
                f"{prefix}.latent_dim={self.latent_dim}")


@dataclass
class TokenizerOutput:
    recon: torch.Tensor            # (B, C, H, W) decoder output from the quantized latents
    z_hat: torch.Tensor            # (B, T, d) encoder output before quantization
    quant: QuantizerOutput


def _norm(ch: int) -> nn.GroupNorm:
    # 32 groups as in taming/LlamaGen, fewer when the width is not a multiple of 32
    return nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = _norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, ch, 2h, 2w)


def _level(in_ch: int, out_ch: int, num_blocks: int) -> tuple[list[nn.Module], int]:
    """Residual blocks of one resolution level; returns (modules, output width)."""
    blocks: list[nn.Module] = []
    for _ in range(num_blocks):
        blocks.append(ResBlock(in_ch, out_ch))
        in_ch = out_ch
    return blocks, in_ch


class Encoder(nn.Module):
    def __init__(self, cfg: ConvTokenizerConfig):
        super().__init__()
        chs = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)]
        ch = chs[0]
        for i, width in enumerate(chs):
            blocks, ch = _level(ch, width, cfg.num_res_blocks)
            layers += blocks
            if i < len(chs) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))  # halves H and W
        layers += [_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, C, H, W) -> (B, d, h, w)


class Decoder(nn.Module):
    def __init__(self, cfg: ConvTokenizerConfig):
        super().__init__()
        chs = cfg.channels
        ch = chs[-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_dim, ch, 3, padding=1)]
        for i in reversed(range(len(chs))):
            blocks, ch = _level(ch, chs[i], cfg.num_res_blocks)
            layers += blocks
            if i > 0:
                layers.append(Upsample(ch))
        layers += [_norm(ch), nn.SiLU(), nn.Conv2d(ch, cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)  # (B, d, h, w) -> (B, C, H, W)


class ConvTokenizer(nn.Module):
    def __init__(self, config: ConvTokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(config.quantizer)
        self.decoder = Decoder(config)

    @property
    def grid_size(self) -> tuple[int, int]:
        side = self.config.image_size // self.config.downsample
        return side, side

    @property
    def num_tokens(self) -> int:
        h, w = self.grid_size
        return h * w

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image in [-1, 1] -> z_hat (B, T, d), raster (row-major) order."""
        z = self.encoder(x)  # (B, d, h, w)
        return z.flatten(2).transpose(1, 2)  # (B, h*w, d)

    def quantize(self, z_hat: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(z_hat)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """(B, T, d) code vectors in raster order -> (B, C, H, W) image."""
        h, w = self.grid_size
        B, T, d = quantized.shape
        if T != h * w:
            raise ValueError(f"decode expects {h * w} tokens per image, got {T}")
        z = quantized.transpose(1, 2).reshape(B, d, h, w)  # (B, d, h, w)
        return self.decoder(z)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, T) long tokens (e.g. an AR prior's samples) -> (B, C, H, W) image."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        z_hat = self.encode(x)
        quant = self.quantize(z_hat)
        return TokenizerOutput(recon=self.decode(quant.quantized), z_hat=z_hat, quant=quant)


def _preset(channels: List[int], num_res_blocks: int, latent_dim: int, codebook_size: int, image_size: int = 32,
            downsample: int = 4, distance: str = "l2") -> Callable[[], ConvTokenizerConfig]:
    def make() -> ConvTokenizerConfig:
        return ConvTokenizerConfig(
            image_size=image_size, downsample=downsample, channels=list(channels), num_res_blocks=num_res_blocks,
            latent_dim=latent_dim,
            quantizer=QuantizerConfig(codebook_size=codebook_size, dim=latent_dim, distance=distance))
    return make


# size registry. tiny/small/base: 32x32 images, downsample 4 -> 64 tokens. The f8/f16 presets are
# the ImageNet recipes' (configs/experiment/imagenet{64,256}.yaml): LlamaGen's VQ-16 layout
# (widths 128-128-256-256-512, two residual blocks per level) without its attention blocks, with
# its 8-d l2-normalised (cosine) codes, which keep a large codebook in use.
PRESETS: Dict[str, Callable[[], ConvTokenizerConfig]] = {
    "tiny": _preset([16, 32, 32], num_res_blocks=1, latent_dim=8, codebook_size=32),      # tests
    "small": _preset([64, 128, 128], num_res_blocks=1, latent_dim=32, codebook_size=256),  # CPU experiments
    "base": _preset([128, 256, 256], num_res_blocks=2, latent_dim=64, codebook_size=1024),  # GPUs, the paper's K
    # 64x64 -> 8x8 = 64 tokens, K=4096: class-conditional ImageNet at CIFAR-10's sequence length
    "base_f8": _preset([128, 128, 256, 256], num_res_blocks=2, latent_dim=8, codebook_size=4096, image_size=64,
                       downsample=8, distance="cosine"),
    # 256x256 -> 16x16 = 256 tokens, K=16384: the paper's ImageNet setting (LlamaGen VQ-16's K and grid)
    "base_f16": _preset([128, 128, 256, 256, 512], num_res_blocks=2, latent_dim=8, codebook_size=16384,
                        image_size=256, downsample=16, distance="cosine"),
}


def conv_tokenizer_config(size: str) -> ConvTokenizerConfig:
    """A fresh config of a named preset ("tiny", "small", "base", "base_f8", "base_f16")."""
    check_choice("tokenizer.size", size, PRESETS)
    return PRESETS[size]()
