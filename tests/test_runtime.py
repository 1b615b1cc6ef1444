"""The GPU fast paths on the CPU: torch.compile and its eager fallback, channels-last
convolutions, the fused-AdamW switch, and the SLURM thread count. Each must either run the
same numbers as the plain path or fall back to it cleanly."""
import copy
import logging

import pytest
import torch

from wartok.config import OptimConfig
from wartok.models import GPT, ConvTokenizer, conv_tokenizer_config, gpt_config
from wartok.optim import build_optimizer
from wartok.runtime import maybe_compile, threads_from_scheduler


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(gpt_config("tiny", vocab_size=17, block_size=12)).train()


def loss_and_grads(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    _, loss = model(tokens, targets=tokens)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


def test_compile_off_returns_the_module_untouched():
    model = tiny_gpt()
    assert maybe_compile(model, enabled=False) is model
    assert model._compiled_call_impl is None


def test_a_backend_that_fails_falls_back_to_eager_with_the_same_numbers(caplog):
    tokens = torch.randint(17, (4, 12), generator=torch.Generator().manual_seed(1))
    eager = tiny_gpt()
    compiled = maybe_compile(copy.deepcopy(eager), enabled=True, backend=failing_backend)
    with caplog.at_level(logging.WARNING):
        loss, grads = loss_and_grads(compiled, tokens)
    expected_loss, expected_grads = loss_and_grads(eager, tokens)
    assert torch.equal(loss, expected_loss)
    for got, want in zip(grads, expected_grads):
        assert torch.equal(got, want)
    assert "this backend cannot compile anything" in caplog.text  # the fallback is not silent
    torch._dynamo.reset()


def test_compiling_in_place_keeps_the_state_dict_keys():
    model = tiny_gpt()
    keys = list(model.state_dict())
    compiled = maybe_compile(model, enabled=True, backend="eager")
    assert compiled is model and list(compiled.state_dict()) == keys  # no `_orig_mod.` prefix
    GPT(model.config).load_state_dict(compiled.state_dict())  # loads into an eager model
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_on_the_cpu_matches_eager():
    """The real compiled path (inductor, C++ codegen): same loss and gradients to float rounding."""
    tokens = torch.randint(17, (4, 12), generator=torch.Generator().manual_seed(1))
    eager = tiny_gpt()
    compiled = maybe_compile(copy.deepcopy(eager), enabled=True)
    loss, grads = loss_and_grads(compiled, tokens)
    expected_loss, expected_grads = loss_and_grads(eager, tokens)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_channels_last_tokenizer_computes_what_the_contiguous_one_does():
    torch.manual_seed(0)
    plain = ConvTokenizer(conv_tokenizer_config("tiny")).train()
    nhwc = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    conv_weights = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert conv_weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    results = []
    for model in (plain, nhwc):
        model.zero_grad(set_to_none=True)
        recon = model(images).recon  # (4, 3, 32, 32)
        recon.square().mean().backward()
        results.append((recon.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-5)
    for got, want in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_fused_adamw_only_on_cuda_and_the_cpu_path_steps():
    model = tiny_gpt()
    cpu_opt = build_optimizer(model.parameters(), OptimConfig(lr=1e-3), torch.device("cpu"))
    assert not cpu_opt.defaults["fused"]
    before = [p.detach().clone() for p in model.parameters()]
    loss_and_grads(model, torch.randint(17, (2, 12)))
    cpu_opt.step()
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    if torch.cuda.is_available():
        gpu_model = tiny_gpt().cuda()
        assert build_optimizer(gpu_model.parameters(), OptimConfig(), torch.device("cuda")).defaults["fused"]


def test_slurm_cpus_per_task_sets_the_thread_count(monkeypatch):
    saved = torch.get_num_threads()
    try:
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        threads_from_scheduler()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # an explicit setting wins
        threads_from_scheduler()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_gfid_samples_through_the_static_cache_are_the_dynamic_caches():
    from wartok.evaluate import samples_uint8

    torch.manual_seed(0)
    tokenizer = ConvTokenizer(conv_tokenizer_config("tiny")).eval()
    prior = GPT(gpt_config("tiny", tokenizer.codebook_size, tokenizer.num_tokens)).eval()
    args = (tokenizer, prior, 5, 3, torch.device("cpu"), "fp32", 1.0, 0, 1.0, 7)
    dynamic = samples_uint8(*args)
    static = samples_uint8(*args, cuda_graph=True)
    assert dynamic.shape == (5, 3, 32, 32) and torch.equal(static, dynamic)
