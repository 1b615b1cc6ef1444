"""1D ViT tokenizer: presets and parameter counts, round trip, straight-through gradient, T latent tokens, configs."""
import dataclasses

import pytest
import torch

from wartok.models import TOKENIZERS, ViT1DTokenizer, ViT1DTokenizerConfig, vit1d_tokenizer_config
from wartok.models.quantizer import QuantizerConfig
from wartok.models.vit1d import PRESETS
from wartok.validate import ConfigError

# the registry's sizes, in parameters (printed by test_presets_shapes_and_parameter_counts)
PARAM_RANGES = {"tiny": (30e3, 60e3), "small": (1.4e6, 1.9e6), "base": (55e6, 70e6)}
OPTIONS = [  # (norm, mlp, decoder_attention)
    ("layer", "gelu", "joint"), ("rms", "geglu", "joint"), ("layer", "gelu", "cross"), ("rms", "geglu", "cross"),
]


def tiny_config(**changes) -> ViT1DTokenizerConfig:
    fields = {**vit1d_tokenizer_config("tiny").__dict__, **changes}
    if "latent_dim" in changes or "distance" in changes:
        fields["quantizer"] = QuantizerConfig(codebook_size=32, dim=fields["latent_dim"],
                                              distance=fields.pop("distance", "l2"))
    return ViT1DTokenizerConfig(**fields)


def tiny_tokenizer(**changes) -> ViT1DTokenizer:
    torch.manual_seed(0)
    return ViT1DTokenizer(tiny_config(**changes))


def images(batch: int = 2, channels: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def expected_parameters(cfg: ViT1DTokenizerConfig) -> int:
    """Closed-form count for LayerNorm + GELU MLP + joint decoder: each block is 12 w^2 + 13 w."""
    def blocks(w: int, depth: int) -> int:
        hidden = round(cfg.mlp_ratio * w)
        attn, mlp, norms = 4 * w * w + 4 * w, 2 * w * hidden + hidden + w, 4 * w
        return depth * (attn + mlp + norms)

    We, Wd, p, C, d = cfg.encoder_width, cfg.decoder_width, cfg.patch_size, cfg.in_channels, cfg.latent_dim
    N, T = cfg.num_patches, cfg.num_tokens
    encoder = (C * p * p * We + We) + N * We + T * We + blocks(We, cfg.encoder_depth) + 2 * We + (We * d + d)
    decoder = (d * Wd + Wd) + T * Wd + Wd + N * Wd + blocks(Wd, cfg.decoder_depth) + 2 * Wd + (Wd * p * p * C + p * p * C)
    return encoder + decoder + cfg.quantizer.codebook_size * d


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_presets_shapes_and_parameter_counts(size):
    cfg = vit1d_tokenizer_config(size)
    if size == "base":  # 63M parameters: build it without memory or init cost, check shapes symbolically
        with torch.device("meta"):
            tok = ViT1DTokenizer(cfg)
            z = tok.encode(torch.empty(2, 3, 32, 32))
            recon = tok.decode(z)
    else:
        torch.manual_seed(0)
        tok = ViT1DTokenizer(cfg).eval()
        out = tok(images(2))
        z, recon = out.z_hat, out.recon
        assert out.quant.indices.shape == (2, cfg.num_tokens)
        assert out.quant.assign_logits.shape == (2, cfg.num_tokens, cfg.quantizer.codebook_size)
    n = sum(p.numel() for p in tok.parameters())
    print(f"vit1d_{size}: {n:,} parameters, {cfg.num_patches} patches -> {cfg.num_tokens} tokens, "
          f"K={cfg.quantizer.codebook_size}, d={cfg.latent_dim}")
    assert z.shape == (2, cfg.num_tokens, cfg.latent_dim)
    assert recon.shape == (2, 3, 32, 32)
    assert tok.num_tokens == cfg.num_tokens and tok.codebook_size == cfg.quantizer.codebook_size
    assert n == expected_parameters(cfg)
    low, high = PARAM_RANGES[size]
    assert low <= n <= high


def test_base_is_the_papers_cifar10_setting():
    cfg = vit1d_tokenizer_config("base")
    assert (cfg.image_size, cfg.num_tokens, cfg.quantizer.codebook_size) == (32, 64, 1024)
    assert cfg.encoder_width == cfg.decoder_width == 512 and cfg.encoder_depth == cfg.decoder_depth == 10


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("norm,mlp,attention", OPTIONS)
def test_decode_indices_round_trip_is_bit_exact(distance, norm, mlp, attention):
    tok = tiny_tokenizer(distance=distance, norm=norm, mlp=mlp, decoder_attention=attention).eval()
    out = tok(images(3))
    K = tok.codebook_size
    assert out.recon.shape == (3, 3, 32, 32)
    assert int(out.quant.indices.min()) >= 0 and int(out.quant.indices.max()) < K
    # the decoder input is exactly c[h], so decoding the indices reproduces the reconstruction bit for bit
    assert torch.equal(tok.quantizer.lookup(out.quant.indices), out.quant.quantized)
    assert torch.equal(tok.decode_indices(out.quant.indices), out.recon)


def test_norm_and_mlp_options_build_what_they_name():
    rms = tiny_tokenizer(norm="rms", mlp="geglu")
    assert any(isinstance(m, torch.nn.RMSNorm) for m in rms.modules())
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in rms.modules())
    plain = tiny_tokenizer()
    assert not any(isinstance(m, torch.nn.RMSNorm) for m in plain.modules())
    # GEGLU's 2/3 hidden width keeps the parameter count of the plain MLP (up to rounding)
    count = lambda tok: sum(p.numel() for p in tok.parameters())  # noqa: E731
    geglu = tiny_tokenizer(mlp="geglu")
    assert abs(count(geglu) - count(plain)) / count(plain) < 0.01


@pytest.mark.parametrize("attention", ["joint", "cross"])
def test_straight_through_gradient_reaches_the_encoder(attention):
    tok = tiny_tokenizer(decoder_attention=attention)
    x = images(2)
    out = tok(x)
    (out.recon - x).pow(2).mean().backward()
    enc_grads = {name: p.grad for name, p in tok.encoder.named_parameters()}
    assert all(g is not None and float(g.abs().sum()) > 0 for g in enc_grads.values()), \
        [name for name, g in enc_grads.items() if g is None or float(g.abs().sum()) == 0]
    # the reconstruction loss alone gives the codebook no gradient: only the codebook term does
    assert tok.quantizer.embedding.grad is None or float(tok.quantizer.embedding.grad.abs().sum()) == 0


def test_straight_through_gradient_equals_the_gradient_at_the_code():
    """d loss / d z_hat through the ST estimator equals d loss / d c[h] of the decoder."""
    tok = tiny_tokenizer().eval()
    z = tok.encode(images(2)).detach().requires_grad_(True)
    q = tok.quantize(z)
    tok.decode(q.quantized).sum().backward()
    code = tok.quantizer.lookup(q.indices).detach().requires_grad_(True)
    tok.decode(code).sum().backward()
    torch.testing.assert_close(z.grad, code.grad)


@pytest.mark.parametrize("patch_size,num_tokens", [(4, 8), (8, 8), (16, 8), (8, 5), (8, 40)])
def test_only_the_latent_tokens_are_quantised(patch_size, num_tokens):
    """T tokens whatever the number of patches, and every latent token reads the whole image."""
    tok = tiny_tokenizer(patch_size=patch_size, num_tokens=num_tokens).eval()
    x = images(2).requires_grad_(True)
    out = tok(x)
    assert tok.config.num_patches == (32 // patch_size) ** 2
    assert out.z_hat.shape == (2, num_tokens, tok.config.latent_dim)
    assert out.quant.indices.shape == (2, num_tokens) and tok.num_tokens == num_tokens
    assert out.recon.shape == x.shape
    # one latent token of image 0 depends on every patch of image 0 (attention) and on nothing of image 1
    (grad,) = torch.autograd.grad(out.z_hat[0, -1].sum(), x)
    per_patch = grad[0].abs().sum(0).unfold(0, patch_size, patch_size).unfold(1, patch_size, patch_size).sum((-1, -2))
    assert bool((per_patch > 0).all()) and float(grad[1].abs().sum()) == 0


def test_wrong_shapes_are_refused():
    tok = tiny_tokenizer().eval()
    with pytest.raises(ValueError, match=r"32 tokens"):
        tok.decode(torch.zeros(1, 16, tok.config.latent_dim))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tok.encode(torch.zeros(1, 3, 28, 28))


def test_bf16_autocast_keeps_the_quantiser_in_float32():
    tok = tiny_tokenizer().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tok(images(2))
    assert out.quant.assign_logits.dtype == torch.float32 and bool(torch.isfinite(out.recon).all())


def test_grey_images_and_state_dict_round_trip():
    cfg = tiny_config(in_channels=1)
    tok = ViT1DTokenizer(cfg).eval()
    x = images(2, channels=1)
    again = ViT1DTokenizer(ViT1DTokenizerConfig(**dataclasses.asdict(cfg))).eval()  # nested dict -> QuantizerConfig
    again.load_state_dict(tok.state_dict())
    assert torch.equal(again(x).recon, tok(x).recon) and tok(x).recon.shape == x.shape


@pytest.mark.parametrize("field,value,allowed", [
    ("name", "conv", "vit1d"),
    ("image_size", 30, "multiple of 8"),
    ("patch_size", 0, "integer >= 1"),
    ("num_tokens", 0, "integer >= 1"),
    ("encoder_heads", 3, "must divide 32"),
    ("decoder_heads", 5, "must divide 32"),
    ("decoder_depth", 0, "integer >= 1"),
    ("mlp_ratio", 0.0, "> 0.0"),
    ("norm", "batch", "layer, rms"),
    ("mlp", "relu", "gelu, geglu"),
    ("decoder_attention", "none", "joint, cross"),
])
def test_bad_settings_fail_with_one_line(field, value, allowed):
    with pytest.raises(ConfigError) as err:
        ViT1DTokenizerConfig(**{**vit1d_tokenizer_config("tiny").__dict__, field: value})
    msg = str(err.value)
    assert f"tokenizer.{field}={value!r}" in msg and allowed in msg and "\n" not in msg


def test_quantizer_dim_must_equal_latent_dim():
    with pytest.raises(ConfigError, match=r"^tokenizer\.quantizer\.dim=8 .*tokenizer\.latent_dim=4$"):
        ViT1DTokenizerConfig(**{**vit1d_tokenizer_config("tiny").__dict__, "latent_dim": 4})


def test_unknown_preset_names_the_allowed_values():
    with pytest.raises(ConfigError, match=r"tiny, small, base"):
        vit1d_tokenizer_config("huge")


def test_registered_as_a_tokenizer_and_a_hydra_option():
    from wartok.config import load_tokenizer_config, tokenizer_options
    from wartok.sweep import compose

    assert TOKENIZERS["vit1d"] == (ViT1DTokenizerConfig, ViT1DTokenizer)
    assert {f"vit1d_{size}" for size in PRESETS} <= set(tokenizer_options())
    for size in PRESETS:
        cfg = load_tokenizer_config(compose([f"tokenizer=vit1d_{size}"]).tokenizer)
        assert isinstance(cfg, ViT1DTokenizerConfig) and cfg == vit1d_tokenizer_config(size)
    node = compose(["tokenizer=vit1d_tiny", "tokenizer.norm=rms", "tokenizer.mlp=geglu"]).tokenizer
    assert (load_tokenizer_config(node).norm, load_tokenizer_config(node).mlp) == ("rms", "geglu")
    with pytest.raises(ConfigError, match=r"tokenizer\.encoder_heads=3 .*must divide 32"):
        load_tokenizer_config(compose(["tokenizer=vit1d_tiny", "tokenizer.encoder_heads=3"]).tokenizer)


def test_each_method_runs_end_to_end_on_the_vit1d_tokenizer(tmp_path):
    """The real entry point, tokenizer=vit1d_tiny, two_stage / joint / wartok as one multirun on
    Fashion-MNIST: the priors read the 64 latent tokens in their 1D order (T = num_latent_tokens),
    and wartok's signal runs on the transformer's assignment logits."""
    import json
    import os
    import subprocess
    import sys

    from wartok.results import read_result
    from wartok.sweep import PROJECT_ROOT

    sweep_dir = tmp_path / "vit1d"
    proc = subprocess.run(
        [sys.executable, "-m", "wartok.sweep", "-m", "experiment=smoke", "tokenizer=vit1d_tiny", "device=cpu",
         "method=two_stage,joint,wartok", "metrics.enabled=false", "stage_a.steps=4", "stage_b.steps=3",
         "stage_c.steps=3", "stage_d.steps=3", "stage_c.log_every=1", "data.train_subset=128",
         "data.heldout_subset=64", "eval.num_grid_images=4", f"hydra.sweep.dir={sweep_dir}"],
        cwd=PROJECT_ROOT, env={**os.environ, "WARTOK_CACHE": str(tmp_path / "cache")},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tokens = vit1d_tokenizer_config("tiny").num_tokens
    for job, method in enumerate(("two_stage", "joint", "wartok")):
        result = read_result(sweep_dir / str(job) / "result.json")
        assert result["status"] == "completed" and result["method"] == method
        assert result["metrics"]["ar_loss"]["n"] == 64 * tokens  # every held-out latent token scored
        lines = [json.loads(line) for line in (sweep_dir / str(job) / "scalars.jsonl").read_text().splitlines()]
        stage_c = [line for line in lines if line["stage"] == "c"]
        assert stage_c and ("delta_abs" in stage_c[-1]) == (method == "wartok")
