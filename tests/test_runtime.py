"""The GPU fast paths on the CPU: torch.compile and its eager fallback, channels-last
convolutions, fused AdamW's skip of a flagged step, and the SLURM thread count. Each must either
run the same numbers as the plain path or fall back to it cleanly. And training steps that read
nothing back from the device between log lines (on a GPU, each such read is a sync)."""
import copy
import dataclasses
import inspect
import logging
import math
from typing import Callable

import pytest
import torch

from wartok.bench import synthetic_batches
from wartok.config import OptimConfig, StageConfig
from wartok.loop import Averages, NonFiniteSteps, StageContext
from wartok.method import build_prior_term
from wartok.models import GPT, ConvTokenizer, conv_tokenizer_config, gpt_config
from wartok.optim import build_optimizer
from wartok.results import ScalarLog
from wartok.runtime import maybe_compile, threads_from_scheduler
from wartok.stages import train_prior, train_tokenizer
from wartok.tvc import TVCConfig


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


def test_a_flagged_fused_adamw_step_leaves_no_trace():
    """The loop's non-finite skip: found_inf=1 must leave weights, moments and step counts exactly
    as they were, so a run with a skipped NaN step continues as if that step never happened."""
    model, twin = tiny_gpt(), tiny_gpt()
    opt, twin_opt = (build_optimizer(m.parameters(), OptimConfig(lr=1e-2, warmup_steps=0)) for m in (model, twin))
    assert opt.defaults["fused"]
    batches = [torch.randint(17, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for i, tokens in enumerate(batches):
        loss_and_grads(model, tokens)
        if i == 1:
            for p in model.parameters():
                p.grad.fill_(float("nan"))
        opt.found_inf = torch.tensor(float(i == 1))
        opt.step()
        if i != 1:
            loss_and_grads(twin, tokens)
            twin_opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), tiny_gpt().parameters()))  # it trained
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], twin_opt.state[q][key]), key


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


# Tensor -> Python reads: on a GPU each one waits for the device to finish all queued work.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")
# Where the loop may read: its log lines, checkpoints and non-finite check; and host-side tensors
# (the replay buffer's CPU generator), which never touch a device.
ALLOWED_READERS = {"check", "pop", "save", "draw"}


def record_host_reads(monkeypatch) -> list[set[str]]:
    """From now until monkeypatch.undo(): for each host read, the wartok functions on the stack."""
    reads: list[set[str]] = []
    for name in HOST_READS:
        def read(self, *args, _original=getattr(torch.Tensor, name), **kwargs):
            reads.append({frame.function for frame in inspect.stack()[1:] if "/wartok/" in frame.filename})
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, read)
    return reads


def reads_in_steps(reads: list[set[str]]) -> list[set[str]]:
    return [callers for callers in reads if callers and not callers & ALLOWED_READERS]


def tokenizer_stage(method: str, device: torch.device, tmp_path,
                    restarts: bool = False) -> Callable[[], dict[str, float]]:
    """Builds six stage-C steps of `method` with tiny models, logging every third; calling the
    result trains them and returns the last averages. restarts: EMA codebook with dead-code
    restarts, at a threshold (100 hits, of 512 tokens a batch) that restarts every code every step."""
    torch.manual_seed(0)
    config = conv_tokenizer_config("tiny")
    if restarts:
        config = dataclasses.replace(config, quantizer=dataclasses.replace(
            config.quantizer, ema=True, dead_code_restart=True, dead_code_threshold=100.0))
    tokenizer = ConvTokenizer(config).to(device)
    target = GPT(gpt_config("tiny", tokenizer.codebook_size, tokenizer.num_tokens)).to(device)
    term = build_prior_term(method, target, TVCConfig().prior, seed=0)
    ctx = StageContext(device=device, precision="fp32", log=ScalarLog(tmp_path / "scalars.jsonl"))
    batches, stage = synthetic_batches(8, device), StageConfig(steps=6, log_every=3)
    return lambda: train_tokenizer("c", tokenizer, batches, stage, TVCConfig(), ctx, term).last


@pytest.mark.parametrize("method, restarts", [("two_stage", False), ("joint", False), ("wartok", False),
                                              ("two_stage", True)])
def test_training_steps_read_nothing_back_from_the_device(method, restarts, monkeypatch, tmp_path):
    train = tokenizer_stage(method, torch.device("cpu"), tmp_path, restarts)
    reads = record_host_reads(monkeypatch)
    last = train()
    monkeypatch.undo()
    assert math.isfinite(last["loss"])
    assert reads_in_steps(reads) == []
    assert any("pop" in callers for callers in reads)  # the reads at log lines are seen: the probe works


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method, restarts", [("two_stage", False), ("joint", False), ("wartok", False),
                                              ("two_stage", True)])
def test_on_a_gpu_training_steps_never_synchronise(method, restarts, monkeypatch, tmp_path):
    """CUDA's own sync detector raises on any synchronising call outside the loop's log lines,
    checkpoints and non-finite check (bincount, nonzero, .item(), a D2H copy, ...)."""
    for owner, name in ((NonFiniteSteps, "check"), (Averages, "pop")):
        def allowed(self, *args, _original=getattr(owner, name), **kwargs):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return _original(self, *args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        monkeypatch.setattr(owner, name, allowed)
    train = tokenizer_stage(method, torch.device("cuda"), tmp_path, restarts)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        last = train()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert math.isfinite(last["loss"])


def test_prior_training_steps_read_nothing_back_from_the_device(monkeypatch, tmp_path):
    prior = GPT(gpt_config("tiny", vocab_size=17, block_size=12))
    tokens = torch.randint(17, (4, 12), generator=torch.Generator().manual_seed(0))
    batches = iter([(tokens, torch.zeros(4, dtype=torch.long))] * 6)
    ctx = StageContext(device=torch.device("cpu"), precision="fp32", log=ScalarLog(tmp_path / "scalars.jsonl"))
    reads = record_host_reads(monkeypatch)
    train_prior("d", prior, batches, StageConfig(steps=6, log_every=3), ctx)
    monkeypatch.undo()
    assert reads_in_steps(reads) == []
    assert any("pop" in callers for callers in reads)
