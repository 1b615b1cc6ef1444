"""Static-shape decoding: logits equal the dynamic cache and the full forward, sampling through
the static decoder (eagerly on the CPU, as a CUDA graph on CUDA) gives the same tokens."""
import functools

import pytest
import torch

import wartok.models.sample as sample
from wartok.models import GPT, StaticDecoder, generate, gpt_config


def tiny_gpt(pos="learned", num_classes=0, seed=0, device="cpu") -> GPT:
    cfg = gpt_config("tiny", vocab_size=17, block_size=12, num_classes=num_classes)
    cfg.pos = pos
    torch.manual_seed(seed)
    return GPT(cfg).to(device).eval()


def static_logits(model, decoder, idx, cond=None):
    """Teacher-forced logits (B, T, K) of idx (B, T) through a StaticDecoder."""
    steps = []
    for t in range(idx.shape[1]):
        x = model.step_inputs(idx[:, t - 1] if t else None, cond, idx.shape[0], t)  # (B, 1, C)
        steps.append(decoder.step(x, t))
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("pos", ["learned", "rope"])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_static_step_matches_the_dynamic_cache_and_the_full_forward(pos, num_classes):
    model = tiny_gpt(pos, num_classes)
    idx = torch.randint(17, (2, 12))
    cond = torch.tensor([0, 2]) if num_classes else None
    with torch.no_grad():
        full, _ = model(idx, cond=cond)
        cache = model.new_cache(2)
        dynamic = torch.stack([model.decode_step(idx[:, t - 1] if t else None, cond, cache, t)
                               for t in range(12)], dim=1)
        decoder = StaticDecoder(model, 2)
        assert not decoder.use_graph  # CPU: the eager fallback
        buffers = [b.data_ptr() for b in decoder.cache.k + decoder.cache.v]
        static = static_logits(model, decoder, idx, cond)
    assert static.shape == (2, 12, 17)
    torch.testing.assert_close(static, full, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(static, dynamic, rtol=1e-4, atol=1e-5)
    # the step wrote in place: same buffers, full block_size slots
    assert [b.data_ptr() for b in decoder.cache.k + decoder.cache.v] == buffers
    assert decoder.cache.k[0].shape == (2, 2, 12, 32)


def test_a_reused_decoder_masks_the_previous_sequence():
    model = tiny_gpt("rope")
    a, b = torch.randint(17, (2, 2, 12))
    decoder = StaticDecoder(model, 2)
    with torch.no_grad():
        static_logits(model, decoder, a)  # leaves a's keys in every slot
        again = static_logits(model, decoder, b[:, :5])  # only positions 0..4 of b rewritten
        full, _ = model(b)
    torch.testing.assert_close(again, full[:, :5], rtol=1e-4, atol=1e-5)


def test_static_step_needs_an_allocated_cache_and_an_eval_model():
    model = tiny_gpt()
    with pytest.raises(RuntimeError, match="allocate"):
        model.static_step(torch.zeros(1, 1, 64), model.new_cache(1), torch.tensor(0))
    with pytest.raises(ValueError, match="eval"):
        StaticDecoder(model.train(), 1)
    with pytest.raises(ValueError, match="CUDA"):
        StaticDecoder(model.eval(), 1, use_graph=True)


@pytest.mark.parametrize("pos,num_classes,cfg_scale,top_k,top_p", [
    ("learned", 0, 1.0, 0, 1.0),
    ("rope", 0, 1.0, 5, 0.9),
    ("learned", 4, 2.0, 0, 1.0),
    ("rope", 4, 3.0, 6, 0.8),
])
def test_static_sampling_gives_the_same_tokens_as_the_other_paths(pos, num_classes, cfg_scale, top_k, top_p):
    model = tiny_gpt(pos, num_classes)
    cond = torch.arange(6) % 4 if num_classes else None
    kw = dict(cond=cond, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p, temperature=0.9)
    runs = [generate(model, 6, generator=torch.Generator().manual_seed(3), **kw, **path)
            for path in (dict(cuda_graph=True), dict(use_kv_cache=True), dict(use_kv_cache=False))]
    assert runs[0].shape == (6, 12)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0], runs[2])


def test_cuda_graph_needs_the_kv_cache():
    with pytest.raises(ValueError, match="cuda_graph=True.*use_kv_cache=True"):
        generate(tiny_gpt(), 2, cuda_graph=True, use_kv_cache=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pos,num_classes,cfg_scale,top_k,top_p", [
    ("learned", 0, 1.0, 0, 1.0),
    ("rope", 4, 2.0, 5, 0.9),
])
def test_cuda_graph_sampling_matches_the_eager_static_path(monkeypatch, pos, num_classes, cfg_scale, top_k, top_p):
    model = tiny_gpt(pos, num_classes, device="cuda")
    cond = (torch.arange(6) % 4).cuda() if num_classes else None
    kw = dict(cond=cond, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p, temperature=0.9, cuda_graph=True)

    def run():
        return generate(model, 6, generator=torch.Generator(device="cuda").manual_seed(3), **kw)

    graph = run()
    with torch.no_grad():  # the graph replays the same logits as the eager static step
        idx = torch.randint(17, (2, 12), device="cuda")
        replayed = static_logits(model, StaticDecoder(model, 2), idx)
        eager = static_logits(model, StaticDecoder(model, 2, use_graph=False), idx)
    torch.testing.assert_close(replayed, eager)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
        bf16 = run()
    monkeypatch.setattr(sample, "StaticDecoder", functools.partial(StaticDecoder, use_graph=False))
    assert torch.equal(graph, run())
    assert bf16.shape == (6, 12) and bf16.dtype == torch.long
    assert 0 <= int(bf16.min()) and int(bf16.max()) < 17
