"""TiTok-style 1D ViT tokenizer: image (B, C, H, W) <-> T learnable latent tokens, T free of the patch grid.

Encoder: patchify (a stride-p conv), add patch positions, append T learnable latent tokens,
run pre-norm transformer blocks over [patches; latents] with full (bidirectional) attention,
so the latents read the image through attention; only the T latent outputs are projected to
latent_dim and quantised. Decoder: project the quantised tokens to the decoder width, then
either (decoder_attention="joint") run blocks over [mask tokens; latents], one mask token per
patch with its own position, or ("cross") run mask-token blocks that self-attend and
cross-attend to the latents; a linear head maps each mask token to its patch's pixels and the
patches are un-patchified. As in the conv tokenizer the output is unbounded (no tanh): it is
trained against images in [-1, 1]; clamp before saving or computing FID.

The API mirrors ConvTokenizer exactly: encode -> z_hat (B, T, d), quantize -> QuantizerOutput,
decode(quantized), decode_indices(indices), forward -> TokenizerOutput, and the attributes
`encoder`, `quantizer`, `decoder`, `config`, `num_tokens`, `codebook_size`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from wartok.models.conv_tokenizer import TokenizerOutput
from wartok.models.quantizer import QuantizerConfig, QuantizerOutput, VectorQuantizer
from wartok.validate import ConfigError, check_choice, check_finite, check_int

NORMS = ("layer", "rms")
MLPS = ("gelu", "geglu")
DECODER_ATTENTION = ("joint", "cross")
INIT_STD = 0.02  # ViT/TiTok/nanoGPT initialisation of linear layers, positions and learned tokens


@dataclass
class ViT1DTokenizerConfig:
    name: str = "vit1d"           # registry name; the only allowed value here is "vit1d"
    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 4           # image_size must be divisible by it; (image_size / patch_size)^2 patches
    num_tokens: int = 64          # T latent tokens per image, independent of the number of patches
    encoder_width: int = 256
    encoder_depth: int = 4
    encoder_heads: int = 4        # must divide encoder_width
    decoder_width: int = 256
    decoder_depth: int = 4
    decoder_heads: int = 4        # must divide decoder_width
    mlp_ratio: float = 4.0        # MLP hidden = mlp_ratio * width (GEGLU: 2/3 of that, same parameter count)
    norm: str = "layer"           # "layer" (LayerNorm) | "rms" (RMSNorm)
    mlp: str = "gelu"             # "gelu" (Linear-GELU-Linear) | "geglu" (gated GELU)
    decoder_attention: str = "joint"  # "joint": blocks over [mask tokens; latents] | "cross": mask tokens
                                      # self-attend, then cross-attend to the latents
    latent_dim: int = 16
    quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(dim=16))

    def __post_init__(self) -> None:
        # accept plain containers (e.g. from a YAML loader or a checkpoint's asdict) for the nested field
        if isinstance(self.quantizer, dict):
            self.quantizer = QuantizerConfig(**self.quantizer)
        self.validate("tokenizer")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def validate(self, prefix: str) -> None:
        """Raise ConfigError naming `prefix.<field>` for the first bad value."""
        check_choice(f"{prefix}.name", self.name, ["vit1d"])
        for key in ("image_size", "in_channels", "patch_size", "num_tokens", "latent_dim"):
            check_int(f"{prefix}.{key}", getattr(self, key), 1)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{prefix}.image_size={self.image_size!r} is not allowed with {prefix}.patch_size={self.patch_size}; "
                f"it must be a multiple of {self.patch_size}")
        for part in ("encoder", "decoder"):
            width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
            check_int(f"{prefix}.{part}_width", width, 1)
            check_int(f"{prefix}.{part}_depth", getattr(self, f"{part}_depth"), 1)
            check_int(f"{prefix}.{part}_heads", heads, 1)
            if width % heads:
                raise ConfigError(
                    f"{prefix}.{part}_heads={heads!r} is not allowed with {prefix}.{part}_width={width}; "
                    f"it must divide {width}")
        check_finite(f"{prefix}.mlp_ratio", self.mlp_ratio, minimum=0.0, strict=True)
        check_choice(f"{prefix}.norm", self.norm, NORMS)
        check_choice(f"{prefix}.mlp", self.mlp, MLPS)
        check_choice(f"{prefix}.decoder_attention", self.decoder_attention, DECODER_ATTENTION)
        if not isinstance(self.quantizer, QuantizerConfig):
            raise ConfigError(f"{prefix}.quantizer={self.quantizer!r} is not allowed; it must be a QuantizerConfig")
        self.quantizer.validate(f"{prefix}.quantizer")
        if self.quantizer.dim != self.latent_dim:
            raise ConfigError(
                f"{prefix}.quantizer.dim={self.quantizer.dim!r} is not allowed; it must equal "
                f"{prefix}.latent_dim={self.latent_dim}")


def _norm(kind: str, width: int) -> nn.Module:
    return nn.RMSNorm(width, eps=1e-6) if kind == "rms" else nn.LayerNorm(width, eps=1e-6)


class Attention(nn.Module):
    """Multi-head attention of x over `memory` (x itself when None), no mask: every token sees every token."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        # q and kv are separate so that the same module serves self- and cross-attention
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor] = None) -> torch.Tensor:
        src = x if memory is None else memory
        B, L, D = x.shape
        S, H = src.shape[1], self.heads
        q = self.q(x).view(B, L, H, D // H).transpose(1, 2)  # (B, H, L, hd)
        k, v = self.kv(src).view(B, S, 2, H, D // H).permute(2, 0, 3, 1, 4)  # each (B, H, S, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, hd)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))  # (B, L, D)


class MLP(nn.Module):
    def __init__(self, width: int, ratio: float, kind: str):
        super().__init__()
        self.gated = kind == "geglu"
        # GEGLU has three matrices instead of two: 2/3 of the hidden width keeps the parameter
        # count of the plain MLP, so the two options compare at equal size (Shazeer 2020)
        hidden = max(1, round(ratio * width * (2 / 3 if self.gated else 1)))
        self.fc = nn.Linear(width, 2 * hidden if self.gated else hidden)
        self.out = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.gated:
            a, gate = h.chunk(2, dim=-1)  # each (B, L, hidden)
            return self.out(a * F.gelu(gate))
        return self.out(F.gelu(h))


class Block(nn.Module):
    """Pre-norm transformer block; with `cross`, a cross-attention sub-layer over the memory follows self-attention."""

    def __init__(self, width: int, heads: int, cfg: ViT1DTokenizerConfig, cross: bool = False):
        super().__init__()
        self.norm1, self.attn = _norm(cfg.norm, width), Attention(width, heads)
        self.cross = cross
        if cross:
            self.norm_x, self.norm_mem = _norm(cfg.norm, width), _norm(cfg.norm, width)
            self.cross_attn = Attention(width, heads)
        self.norm2, self.mlp = _norm(cfg.norm, width), MLP(width, cfg.mlp_ratio, cfg.mlp)

    def forward(self, x: torch.Tensor, memory: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        if self.cross:
            x = x + self.cross_attn(self.norm_x(x), self.norm_mem(memory))
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: ViT1DTokenizerConfig):
        super().__init__()
        D, p = cfg.encoder_width, cfg.patch_size
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, p, stride=p)  # one D-vector per p x p patch
        self.pos = nn.Parameter(torch.randn(cfg.num_patches, D) * INIT_STD)
        # the latent tokens are distinct learned vectors, so they need no position embedding of their own
        self.latents = nn.Parameter(torch.randn(cfg.num_tokens, D) * INIT_STD)
        self.blocks = nn.ModuleList(Block(D, cfg.encoder_heads, cfg) for _ in range(cfg.encoder_depth))
        self.norm = _norm(cfg.norm, D)
        self.head = nn.Linear(D, cfg.latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        latents = self.latents.expand(x.shape[0], -1, -1)  # (B, T, D)
        h = torch.cat([patches, latents], dim=1)  # (B, N + T, D)
        for block in self.blocks:
            h = block(h)
        T = self.latents.shape[0]
        return self.head(self.norm(h[:, -T:]))  # only the latent outputs: (B, T, d)


class Decoder(nn.Module):
    def __init__(self, cfg: ViT1DTokenizerConfig):
        super().__init__()
        D, p = cfg.decoder_width, cfg.patch_size
        self.cfg = cfg
        self.embed = nn.Linear(cfg.latent_dim, D)
        self.latent_pos = nn.Parameter(torch.randn(cfg.num_tokens, D) * INIT_STD)
        self.mask_token = nn.Parameter(torch.randn(D) * INIT_STD)
        self.pos = nn.Parameter(torch.randn(cfg.num_patches, D) * INIT_STD)  # the mask tokens' patch positions
        cross = cfg.decoder_attention == "cross"
        self.blocks = nn.ModuleList(Block(D, cfg.decoder_heads, cfg, cross=cross) for _ in range(cfg.decoder_depth))
        self.norm = _norm(cfg.norm, D)
        self.head = nn.Linear(D, p * p * cfg.in_channels)

    def forward(self, quantized: torch.Tensor) -> torch.Tensor:
        B, N = quantized.shape[0], self.pos.shape[0]
        latents = self.embed(quantized) + self.latent_pos  # (B, T, D)
        masks = (self.mask_token + self.pos).expand(B, -1, -1)  # (B, N, D)
        if self.cfg.decoder_attention == "cross":
            h = masks
            for block in self.blocks:
                h = block(h, memory=latents)  # (B, N, D)
        else:
            h = torch.cat([masks, latents], dim=1)  # (B, N + T, D)
            for block in self.blocks:
                h = block(h)
            h = h[:, :N]  # (B, N, D)
        return self.unpatchify(self.head(self.norm(h)))  # (B, N, p*p*C) -> (B, C, H, W)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) raster-ordered patches -> (B, C, H, W)."""
        cfg, B = self.cfg, patches.shape[0]
        p, C, g = cfg.patch_size, cfg.in_channels, cfg.image_size // cfg.patch_size
        x = patches.view(B, g, g, p, p, C)  # (B, gh, gw, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)  # (B, C, gh*p, gw*p)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ViT1DTokenizer(nn.Module):
    def __init__(self, config: ViT1DTokenizerConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # initialise before the quantizer exists: it keeps its own VQ-VAE codebook initialisation
        self.apply(_init_weights)
        self.quantizer = VectorQuantizer(config.quantizer)

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) image in [-1, 1] -> z_hat (B, T, d): the T latent tokens, in their learned order."""
        size, C = self.config.image_size, self.config.in_channels
        if tuple(x.shape[1:]) != (C, size, size):
            raise ValueError(f"encode expects images of shape (B, {C}, {size}, {size}), got {tuple(x.shape)}")
        return self.encoder(x)

    def quantize(self, z_hat: torch.Tensor) -> QuantizerOutput:
        return self.quantizer(z_hat)

    def decode(self, quantized: torch.Tensor) -> torch.Tensor:
        """(B, T, d) code vectors -> (B, C, H, W) image."""
        T = quantized.shape[1]
        if T != self.num_tokens:
            raise ValueError(f"decode expects {self.num_tokens} tokens per image, got {T}")
        return self.decoder(quantized)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, T) long tokens (e.g. an AR prior's samples) -> (B, C, H, W) image."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, x: torch.Tensor) -> TokenizerOutput:
        z_hat = self.encode(x)
        quant = self.quantize(z_hat)
        return TokenizerOutput(recon=self.decode(quant.quantized), z_hat=z_hat, quant=quant)


def _preset(patch_size: int, num_tokens: int, width: int, depth: int, heads: int, latent_dim: int,
            codebook_size: int) -> Callable[[], ViT1DTokenizerConfig]:
    def make() -> ViT1DTokenizerConfig:
        return ViT1DTokenizerConfig(
            image_size=32, patch_size=patch_size, num_tokens=num_tokens,
            encoder_width=width, encoder_depth=depth, encoder_heads=heads,
            decoder_width=width, decoder_depth=depth, decoder_heads=heads, latent_dim=latent_dim,
            quantizer=QuantizerConfig(codebook_size=codebook_size, dim=latent_dim))
    return make


# size registry: 32x32 images. Low latent dims (8-16) follow TiTok / ViT-VQGAN's factorised
# codes, which keep more of a large codebook in use than the conv presets' 32-64 dims.
PRESETS: Dict[str, Callable[[], ViT1DTokenizerConfig]] = {
    # tests: 16 patches -> 32 tokens, so T differs from the patch count
    "tiny": _preset(patch_size=8, num_tokens=32, width=32, depth=1, heads=2, latent_dim=8, codebook_size=32),
    # CPU experiments: 64 patches -> 64 tokens, the conv presets' token count
    "small": _preset(patch_size=4, num_tokens=64, width=128, depth=4, heads=4, latent_dim=16, codebook_size=256),
    # GPUs, the paper's CIFAR-10 setting: 256 patches -> 64 tokens, K=1024, 10 + 10 layers of width 512
    "base": _preset(patch_size=2, num_tokens=64, width=512, depth=10, heads=8, latent_dim=16, codebook_size=1024),
}


def vit1d_tokenizer_config(size: str) -> ViT1DTokenizerConfig:
    """A fresh config of a named size ("tiny", "small", "base")."""
    check_choice("tokenizer.size", size, PRESETS)
    return PRESETS[size]()
