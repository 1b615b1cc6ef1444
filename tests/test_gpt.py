"""GPT prior: causality, loss, KV-cache equivalence, class conditioning, sampling filters."""
import math

import pytest
import torch
import torch.nn.functional as F

from wartok.models import GPT, filter_logits, generate, gpt_config


def tiny_gpt(pos="learned", num_classes=0, seed=0) -> GPT:
    cfg = gpt_config("tiny", vocab_size=17, block_size=12, num_classes=num_classes)
    cfg.pos = pos
    torch.manual_seed(seed)
    return GPT(cfg).eval()


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_changing_a_later_token_leaves_earlier_logits_unchanged(pos):
    model = tiny_gpt(pos)
    idx = torch.randint(17, (2, 12))
    logits, _ = model(idx)
    assert logits.shape == (2, 12, 17)
    for t in range(11):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 17
        other, _ = model(changed)
        torch.testing.assert_close(other[:, : t + 2], logits[:, : t + 2])  # logits t+1 predict h_{t+1}: unchanged
        if t + 2 < 12:
            assert not torch.allclose(other[:, t + 2:], logits[:, t + 2:])


def test_loss_is_the_mean_next_token_cross_entropy_in_nats():
    model = tiny_gpt()
    idx = torch.randint(17, (3, 12))
    logits, loss = model(idx, targets=idx)
    expected = F.cross_entropy(logits.reshape(-1, 17), idx.reshape(-1))
    torch.testing.assert_close(loss, expected)
    # an untrained model with small init is close to uniform: loss near log K
    assert abs(loss.detach().item() - math.log(17)) < 0.2


def test_first_position_logits_do_not_depend_on_the_sequence():
    model = tiny_gpt()
    a, _ = model(torch.randint(17, (1, 12)))
    b, _ = model(torch.randint(17, (1, 12)))
    torch.testing.assert_close(a[:, 0], b[:, 0])


@pytest.mark.parametrize("pos", ["learned", "rope"])
def test_decode_step_with_cache_matches_the_full_forward(pos):
    model = tiny_gpt(pos)
    idx = torch.randint(17, (2, 12))
    full, _ = model(idx)
    cache = model.new_cache(2)
    for t in range(12):
        step = model.decode_step(idx[:, t - 1] if t else None, None, cache, t)
        torch.testing.assert_close(step, full[:, t], rtol=1e-4, atol=1e-5)


# sampling with and without the KV cache (and through the static cache): tests/test_static_decode.py


def test_class_condition_changes_the_prediction_and_cfg_dropout_only_in_training():
    model = tiny_gpt(num_classes=3)
    with torch.no_grad():
        model.cls_emb.weight.normal_()  # make classes distinguishable at init
    idx = torch.randint(17, (2, 12))
    l0, _ = model(idx, cond=torch.tensor([0, 0]))
    l1, _ = model(idx, cond=torch.tensor([1, 1]))
    assert not torch.allclose(l0, l1)
    model.config.cfg_dropout = 1.0
    again, _ = model(idx, cond=torch.tensor([0, 0]))  # eval: no label dropout
    torch.testing.assert_close(again, l0)
    model.train()
    model.config.dropout = 0.0
    dropped, _ = model(idx, cond=torch.tensor([0, 0]))  # train, p=1: every label becomes the null class
    null, _ = model(idx)
    torch.testing.assert_close(dropped, null)


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 alone < 0.7, 0.5 + 0.3 >= 0.7 -> keep the first two
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]


def test_sampling_follows_the_model_distribution():
    """With one position and a fixed bias, sample frequencies match softmax(bias)."""
    cfg = gpt_config("tiny", vocab_size=4, block_size=1)
    model = GPT(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias = torch.nn.Parameter(torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4])))
    samples = generate(model, 20000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(samples[:, 0], minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.015, rtol=0)
