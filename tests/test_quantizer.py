"""VectorQuantizer: shapes, assignment logits, loss routing, EMA, dead-code restart, statistics."""
import math

import pytest
import torch
import torch.nn.functional as F

from wartok.models.quantizer import QuantizerConfig, VectorQuantizer, code_counts
from wartok.validate import ConfigError


def _quantizer(**kw) -> VectorQuantizer:
    torch.manual_seed(0)
    q = VectorQuantizer(QuantizerConfig(**{"codebook_size": 16, "dim": 4, **kw}))
    with torch.no_grad():  # spread the codes so that latents hit several of them
        q.embedding.copy_(torch.randn(16, 4))
    return q


def _brute_logits(z, c, distance, tau):
    if distance == "cosine":
        return (F.normalize(z, dim=-1) @ F.normalize(c, dim=-1).t()) / tau
    return -((z[:, :, None, :] - c[None, None]) ** 2).sum(-1) / tau  # (B, T, K)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_shapes_and_logits_match_brute_force(distance):
    q = _quantizer(distance=distance, tau=0.5)
    z = torch.randn(3, 5, 4)
    out = q(z)
    assert out.quantized.shape == (3, 5, 4)
    assert out.indices.shape == (3, 5) and out.indices.dtype == torch.long
    assert out.assign_logits.shape == (3, 5, 16)
    ref = _brute_logits(z, q.embedding.detach(), distance, 0.5)
    torch.testing.assert_close(out.assign_logits, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(out.assign_logits.argmax(-1), out.indices)
    assert torch.equal(ref.argmax(-1), out.indices)
    # the decoder input is the chosen code (normalised for cosine)
    torch.testing.assert_close(out.quantized, q.lookup(out.indices), atol=1e-6, rtol=1e-6)
    if distance == "cosine":
        torch.testing.assert_close(q.codebook.norm(dim=-1), torch.ones(16))


@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_gradients_go_where_they_should(distance):
    q = _quantizer(distance=distance)
    z = torch.randn(2, 6, 4, requires_grad=True)
    out = q(z)
    g_z, g_c = torch.autograd.grad(out.codebook_loss, [z, q.embedding], allow_unused=True, retain_graph=True)
    assert g_z is None and g_c is not None and g_c.abs().sum() > 0
    g_z, g_c = torch.autograd.grad(out.commitment_loss, [z, q.embedding], allow_unused=True, retain_graph=True)
    assert g_c is None and g_z is not None and g_z.abs().sum() > 0
    # straight-through: d(sum quantized)/dz is the identity (through the normalisation for cosine)
    g_z, g_c = torch.autograd.grad(out.quantized.sum(), [z, q.embedding], allow_unused=True, retain_graph=True)
    assert g_c is None
    if distance == "l2":
        torch.testing.assert_close(g_z, torch.ones_like(z))
    # assignment logits reach both z and the codebook
    g_z, g_c = torch.autograd.grad(out.assign_logits.logsumexp(-1).sum(), [z, q.embedding])
    assert g_z.abs().sum() > 0 and g_c.abs().sum() > 0


def test_loss_values():
    q = _quantizer()
    z = torch.randn(2, 6, 4)
    out = q(z)
    expected = ((z - q.embedding.detach()[out.indices]) ** 2).mean()
    torch.testing.assert_close(out.codebook_loss, expected)
    torch.testing.assert_close(out.commitment_loss, expected)


def test_usage_and_perplexity_hand_computed():
    q = VectorQuantizer(QuantizerConfig(codebook_size=4, dim=2))
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]))
    z = torch.tensor([[[0.9, 0.1], [1.1, -0.1], [0.1, 0.8], [-0.7, 0.2]]])  # codes 0, 0, 1, 2
    out = q(z)
    assert out.indices.tolist() == [[0, 0, 1, 2]]
    assert out.usage.item() == pytest.approx(0.75)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert out.perplexity.item() == pytest.approx(math.exp(entropy), rel=1e-5)


def test_ema_updates_codebook_without_gradient():
    q = VectorQuantizer(QuantizerConfig(codebook_size=2, dim=2, ema=True, ema_decay=0.9))
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    assert not q.embedding.requires_grad
    z = torch.tensor([[[2.0, 1.0], [2.0, 3.0], [0.5, 1.0]]])  # all nearest to code 0, mean (1.5, 5/3)
    out = q.train()(z)
    assert out.codebook_loss.item() == 0.0 and not out.codebook_loss.requires_grad
    # cluster sizes start at 1: code 0 -> 0.9 * 1 + 0.1 * 3 = 1.2, code 1 -> 0.9
    torch.testing.assert_close(q.cluster_size, torch.tensor([1.2, 0.9]))
    new0 = (0.9 * torch.tensor([1.0, 0.0]) + 0.1 * torch.tensor([4.5, 5.0])) / 1.2
    torch.testing.assert_close(q.embedding[0], new0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(q.embedding[1], torch.tensor([-1.0, 0.0]), atol=1e-4, rtol=1e-4)
    before = q.embedding.clone()
    q.eval()(z)  # no updates outside training
    assert torch.equal(q.embedding, before)


def test_dead_code_restart_moves_unused_code():
    q = VectorQuantizer(QuantizerConfig(codebook_size=3, dim=2, dead_code_restart=True, dead_code_threshold=0.5))
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [100.0, 100.0]]))
        q.cluster_size.copy_(torch.tensor([5.0, 5.0, 0.0]))  # code 2 has been unused
    z = torch.tensor([[[0.9, 0.0], [1.1, 0.2], [-1.0, 0.1], [-0.8, -0.1]]])
    q.train()(z)
    assert not torch.equal(q.embedding[2], torch.tensor([100.0, 100.0]))
    assert any(torch.equal(q.embedding[2], zi) for zi in z[0])  # re-initialised from a batch latent
    torch.testing.assert_close(q.embedding[:2], torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))  # used codes kept
    assert q.cluster_size[2].item() == pytest.approx(1.0)


def test_dead_codes_restart_from_distinct_latents_then_cycle():
    """Four dead codes, three latents: the first three restart from three different latents, the
    fourth reuses one; live codes and their sizes stay."""
    q = VectorQuantizer(QuantizerConfig(codebook_size=6, dim=2, dead_code_restart=True, dead_code_threshold=0.5))
    with torch.no_grad():
        q.embedding.copy_(torch.tensor([[1.0, 0.0], [50.0, 50.0], [-1.0, 0.0], [60.0, 60.0], [70.0, 70.0], [80.0, 80.0]]))
        q.cluster_size.copy_(torch.tensor([5.0, 0.0, 5.0, 0.0, 0.0, 0.0]))
    z = torch.tensor([[[0.9, 0.1], [-1.1, 0.2], [1.2, -0.3]]])
    q.train()(z)
    latents = [tuple(zi.tolist()) for zi in z[0]]
    restarted = [tuple(q.embedding[k].tolist()) for k in (1, 3, 4, 5)]
    assert all(code in latents for code in restarted)
    assert len(set(restarted[:3])) == 3 and restarted[3] in restarted[:3]
    torch.testing.assert_close(q.embedding[[0, 2]], torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    torch.testing.assert_close(q.cluster_size[[1, 3, 4, 5]], torch.ones(4))


def test_training_step_backward_after_in_place_update():
    """EMA/restart write the codebook in place; backward through the logits must still work."""
    q = _quantizer(ema=True, dead_code_restart=True, dead_code_threshold=2.0).train()
    z = torch.randn(2, 6, 4, requires_grad=True)
    out = q(z)
    (out.assign_logits.logsumexp(-1).sum() + out.commitment_loss).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("kw, name", [
    ({"codebook_size": 1}, "tokenizer.quantizer.codebook_size"),
    ({"tau": 0.0}, "tokenizer.quantizer.tau"),
    ({"tau": -1.0}, "tokenizer.quantizer.tau"),
    ({"distance": "l1"}, "tokenizer.quantizer.distance"),
    ({"ema_decay": 1.0}, "tokenizer.quantizer.ema_decay"),
    ({"dead_code_threshold": -0.1}, "tokenizer.quantizer.dead_code_threshold"),
])
def test_config_errors(kw, name):
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        QuantizerConfig(**kw)


def test_distance_error_lists_allowed_values():
    with pytest.raises(ConfigError, match="l2, cosine"):
        QuantizerConfig(distance="dot")


def test_code_counts_are_bincounts_including_unused_codes():
    indices = torch.randint(50, (4, 64), generator=torch.Generator().manual_seed(0))  # codes 50..63 never hit
    counts = code_counts(indices, 64)
    assert counts.dtype == torch.float32 and counts.shape == (64,)
    assert torch.equal(counts, torch.bincount(indices.flatten(), minlength=64).float())
    assert counts[50:].sum() == 0 and counts.sum() == indices.numel()
