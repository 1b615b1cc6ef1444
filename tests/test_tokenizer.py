"""Conv VQ tokenizer: shapes, decode_indices round trip, straight-through gradient, presets."""
import pytest
import torch

from wartok.models import ConvTokenizer, conv_tokenizer_config
from wartok.models.quantizer import QuantizerConfig
from wartok.validate import ConfigError


def tiny_tokenizer(**quantizer) -> ConvTokenizer:
    cfg = conv_tokenizer_config("tiny")
    if quantizer:
        cfg.quantizer = QuantizerConfig(dim=cfg.latent_dim, codebook_size=cfg.quantizer.codebook_size, **quantizer)
    torch.manual_seed(0)
    return ConvTokenizer(cfg)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_shapes_and_decode_indices_round_trip(distance):
    tok = tiny_tokenizer(distance=distance).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    out = tok(x)
    K = tok.codebook_size
    assert tok.num_tokens == 64
    assert out.recon.shape == x.shape
    assert out.z_hat.shape == (3, 64, tok.config.latent_dim)
    assert out.quant.indices.shape == (3, 64) and out.quant.indices.dtype == torch.long
    assert out.quant.assign_logits.shape == (3, 64, K)
    assert int(out.quant.indices.min()) >= 0 and int(out.quant.indices.max()) < K
    # indices -> decode_indices equals the decoder's output on the quantised input
    torch.testing.assert_close(tok.decode_indices(out.quant.indices), out.recon, rtol=0, atol=1e-6)


def test_hard_indices_are_the_nearest_codes():
    tok = tiny_tokenizer().eval()
    z = tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)  # (B, T, d)
    dist = torch.cdist(z.reshape(-1, z.shape[-1]), tok.quantizer.codebook)  # (B*T, K)
    assert torch.equal(tok.quantize(z).indices.reshape(-1), dist.argmin(dim=-1))


def test_straight_through_gradient_reaches_the_encoder():
    tok = tiny_tokenizer()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = tok(x)
    (out.recon - x).pow(2).mean().backward()
    enc_grads = [p.grad for p in tok.encoder.parameters()]
    assert all(g is not None for g in enc_grads)
    assert sum(float(g.abs().sum()) for g in enc_grads) > 0
    # the reconstruction loss alone gives the codebook no gradient: only the codebook term does
    assert tok.quantizer.embedding.grad is None or float(tok.quantizer.embedding.grad.abs().sum()) == 0


def test_straight_through_gradient_equals_the_gradient_at_the_code():
    """d loss / d z_hat through the ST estimator equals d loss / d c[h] of the decoder."""
    tok = tiny_tokenizer().eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = tok.encode(x).detach().requires_grad_(True)
    q = tok.quantize(z)
    tok.decode(q.quantized).sum().backward()
    code = tok.quantizer.lookup(q.indices).detach().requires_grad_(True)
    tok.decode(code).sum().backward()
    torch.testing.assert_close(z.grad, code.grad)


def test_codebook_and_commitment_terms_are_raw_mean_squared_distances():
    tok = tiny_tokenizer().eval()
    z = tok.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    q = tok.quantize(z)
    expected = (z - tok.quantizer.lookup(q.indices)).pow(2).mean()
    torch.testing.assert_close(q.commitment_loss, expected)
    torch.testing.assert_close(q.codebook_loss, expected)


@pytest.mark.parametrize("field,value,allowed", [
    ("image_size", 30, "multiple of 4"),
    ("downsample", 3, "power of two"),
])
def test_bad_tokenizer_settings_fail_with_one_line(field, value, allowed):
    cfg = conv_tokenizer_config("tiny")
    kwargs = {**cfg.__dict__, field: value}
    with pytest.raises(ConfigError) as err:
        type(cfg)(**kwargs)
    msg = str(err.value)
    assert f"tokenizer.{field}={value}" in msg and allowed in msg and "\n" not in msg


def test_codebook_size_below_two_is_refused():
    with pytest.raises(ConfigError, match=r"codebook_size=1"):
        QuantizerConfig(codebook_size=1)


@pytest.mark.parametrize("size", ["tiny", "small", "base"])
def test_presets_give_64_tokens(size):
    cfg = conv_tokenizer_config(size)
    assert (cfg.image_size // cfg.downsample) ** 2 == 64


def test_unknown_preset_names_the_allowed_values():
    with pytest.raises(ConfigError, match=r"tiny.*small.*base|allowed"):
        conv_tokenizer_config("huge")
