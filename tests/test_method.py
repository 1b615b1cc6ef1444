"""Stage C on real Fashion-MNIST: the prior terms of joint and wartok, and what they must not do."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from wartok.config import load_run_config
from wartok.method import JointTerm, WGFTerm, build_prior_term
from wartok.models import GPT
from wartok.pipeline import prepare, stage_a, stage_b, stage_c
from wartok.results import ScalarLog
from wartok.stages import StageContext, train_prior, train_tokenizer
from wartok.stream import BatchStream
from wartok.tokens import extract_tokens, token_loader
from wartok.sweep import compose
from wartok.tvc import likelihood_terms, posterior_terms, weigh


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory):
    """Stages A and B of the smoke experiment, trained once for the module."""
    folder = tmp_path_factory.mktemp("shared")
    cfg = load_run_config(compose(["experiment=smoke", "device=cpu", "reuse_stages=false"]))
    prep = prepare(cfg)  # also sets the process-wide backends (flush denormals)
    ctx = StageContext(device=torch.device("cpu"), precision="fp32", log=ScalarLog(folder / "scalars.jsonl"))
    tokenizer = stage_a(cfg, prep.data, ctx)
    target, _ = stage_b(cfg, prep.data, tokenizer, ctx)
    return cfg, prep, ctx, tokenizer, target


def with_prior(cfg, method: str, **prior):
    tvc = dataclasses.replace(cfg.tvc, prior=dataclasses.replace(cfg.tvc.prior, **prior))
    return dataclasses.replace(cfg, method=method, tvc=tvc)


def run_stage_c(shared, cfg) -> torch.nn.Module:
    _, prep, ctx, tokenizer, target = shared
    tokenizer = copy.deepcopy(tokenizer)
    stage_c(cfg, prep.data, tokenizer, target, ctx)
    return tokenizer


def test_wgf_weight_zero_reproduces_two_stage_bit_for_bit(shared) -> None:
    cfg = shared[0]
    two_stage = run_stage_c(shared, with_prior(cfg, "two_stage"))
    wartok = run_stage_c(shared, with_prior(cfg, "wartok", weight=0.0, tracker=dataclasses.replace(
        cfg.tvc.prior.tracker, lr=1e-2, refresh_steps=2)))  # a busy tracker must not matter either
    for (name, a), (_, b) in zip(two_stage.state_dict().items(), wartok.state_dict().items()):
        assert torch.equal(a, b), name
    moved = run_stage_c(shared, with_prior(cfg, "wartok", weight=1.0))
    assert not all(torch.equal(a, b) for a, b in zip(two_stage.state_dict().values(), moved.state_dict().values()))


def one_tokenizer_step(shared, term) -> None:
    cfg, prep, _, tokenizer, _ = shared
    tokenizer = copy.deepcopy(tokenizer).train()
    images, labels = next(iter(prep.data.train_loader))
    out = tokenizer(images)
    terms = {**likelihood_terms(images, out.recon), **posterior_terms(out.quant),
             **term.terms(tokenizer, out, labels, step=0)}
    weigh(terms, cfg.tvc, prior_weight=1.0).backward()
    assert tokenizer.encoder.net[0].weight.grad.abs().sum() > 0


def test_no_gradient_reaches_either_ar_model_under_wgf(shared) -> None:
    cfg, _, _, _, target = shared
    term = WGFTerm(target, dataclasses.replace(cfg.tvc.prior, tracker=dataclasses.replace(
        cfg.tvc.prior.tracker, init="scratch")), seed=0)  # tracker != target, so delta != 0
    models = (term.models.tracker, term.models.target)
    before = [copy.deepcopy(m.state_dict()) for m in models]
    one_tokenizer_step(shared, term)
    for model, state in zip(models, before):
        for name, p in model.named_parameters():
            assert p.grad is None, name
            assert torch.equal(p, state[name]), name
    for name, p in target.named_parameters():  # stage B's target itself is never touched
        assert p.grad is None, name


def test_joint_cross_entropy_trains_the_prior_and_reaches_the_encoder(shared) -> None:
    cfg, _, _, _, target = shared
    for ce_input in ("st_onehot", "soft"):
        term = JointTerm(target, dataclasses.replace(cfg.tvc.prior, ce=dataclasses.replace(cfg.tvc.prior.ce, input=ce_input)))
        one_tokenizer_step(shared, term)
        assert all(p.grad is not None for p in term.prior.parameters())
        assert [len(group) for group, _ in term.param_groups()] == [len(list(target.parameters()))]
    assert all(p.grad is None for p in target.parameters())


def test_refresh_schedule_and_ema_target(shared) -> None:
    cfg, _, _, _, target = shared
    prior = dataclasses.replace(cfg.tvc.prior, tracker=dataclasses.replace(cfg.tvc.prior.tracker, refresh_every=4, lr=1e-3),
                                target=dataclasses.replace(cfg.tvc.prior.target, mode="ema", ema_decay=0.5))
    term = build_prior_term("wartok", target, prior, seed=0)
    tokens = torch.randint(cfg.prior.vocab_size, (8, cfg.prior.block_size))
    refreshed = []
    for step in range(8):
        term._last = (tokens, None)
        refreshed.append("tracker_refresh_ce" in term.after_step(step))
    assert refreshed == [False, False, False, True] * 2
    moved = [not torch.equal(a, b) for a, b in zip(term.models.target.parameters(), target.parameters())]
    assert any(moved)  # the EMA target followed the tracker; stage B's target did not move


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_tracker_and_online_target_train_under_the_runs_precision(shared, precision, dtype) -> None:
    """The upkeep steps run outside the tokenizer step's autocast; a bf16 run must not pay for
    them in float32 (on a GPU that is several times their bf16 cost)."""
    cfg, _, _, _, target = shared
    prior = dataclasses.replace(cfg.tvc.prior, target=dataclasses.replace(cfg.tvc.prior.target, mode="online"))
    term = build_prior_term("wartok", target, prior, seed=0, precision=precision)
    seen: dict[str, torch.dtype] = {}
    for name, model in (("tracker", term.models.tracker), ("target", term.models.target)):
        model.lm_head.register_forward_hook(lambda _m, _i, out, name=name: seen.__setitem__(name, out.dtype))
    before = [p.detach().clone() for p in term.models.tracker.parameters()]
    term._last = (torch.randint(cfg.prior.vocab_size, (8, cfg.prior.block_size)), None)
    scalars = term.after_step(0)
    assert seen == {"tracker": dtype, "target": dtype}
    assert torch.isfinite(scalars["tracker_refresh_ce"]) and torch.isfinite(scalars["target_update_ce"])
    assert all(p.dtype == torch.float32 for p in term.models.tracker.parameters())  # weights stay fp32
    assert any(not torch.equal(a, b) for a, b in zip(before, term.models.tracker.parameters()))


def token_histogram(tokenizer: torch.nn.Module, dataset, codebook_size: int) -> torch.Tensor:
    tokens, _ = extract_tokens(tokenizer, dataset, 256, torch.device("cpu"), "fp32")
    return torch.bincount(tokens.flatten(), minlength=codebook_size).double() / tokens.numel()


def test_wgf_alone_moves_the_token_histogram_toward_a_fixed_target(shared) -> None:
    """Toy convergence: a fixed target that puts 85% of its mass on 4 rarely used codes; WGF-only
    training (likelihood and posterior off) lowers KL(token histogram || target marginal)."""
    cfg, prep, ctx, tokenizer, _ = shared
    K, T = cfg.prior.vocab_size, cfg.prior.block_size
    before = token_histogram(tokenizer, prep.data.heldout, K)
    favoured = before.argsort(descending=True)[4:8]
    marginal = torch.full((K,), 0.15 / (K - 4), dtype=torch.float64)
    marginal[favoured] = 0.85 / 4
    g = torch.Generator().manual_seed(0)
    sequences = torch.multinomial(marginal, 1024 * T, replacement=True, generator=g).view(1024, T)
    target = GPT(cfg.prior)
    fit = dataclasses.replace(cfg.stage_b, steps=150, optim=dataclasses.replace(cfg.stage_b.optim, lr=3e-3, warmup_steps=10))
    batches = BatchStream(token_loader(sequences, torch.zeros(1024, dtype=torch.long), 64, seed=0), seed=0)
    train_prior("target", target, batches, fit, ctx)

    def kl(hist: torch.Tensor) -> float:
        return float((hist * ((hist + 1e-6).log() - marginal.log())).sum())

    after = {}
    for weight in (1.0, 0.0):
        prior = dataclasses.replace(cfg.tvc.prior, weight=weight, tracker=dataclasses.replace(
            cfg.tvc.prior.tracker, lr=1e-3, source="batch"))
        tvc = dataclasses.replace(cfg.tvc, prior=prior, likelihood=dataclasses.replace(cfg.tvc.likelihood, enabled=False),
                                  posterior=dataclasses.replace(cfg.tvc.posterior, enabled=False))
        stage = dataclasses.replace(cfg.stage_c, steps=150, optim=dataclasses.replace(cfg.stage_c.optim, lr=1e-3))
        moved = copy.deepcopy(tokenizer)
        train_tokenizer("c", moved, BatchStream(prep.data.train_loader, seed=0), stage, tvc, ctx,
                        prior_term=build_prior_term("wartok", target, prior, seed=0))
        after[weight] = kl(token_histogram(moved, prep.data.heldout, K))
    assert after[1.0] < 0.8 * kl(before), (kl(before), after)
    assert after[0.0] == pytest.approx(kl(before), abs=1e-12)  # without the prior term nothing moves


@pytest.mark.slow
def test_default_wartok_settings_keep_reconstruction_and_usage(tmp_path: Path) -> None:
    """Stability on Fashion-MNIST: 300 stage-C steps at the default wartok settings keep the
    reconstruction loss within 20% of two_stage's and the batch codebook usage within 5 points.

    Measured here (tiny tokenizer, K=32, 4096 images, A 300 / B 200 / C 300 steps): two_stage l2
    0.0504, usage 0.962; default wartok l2 0.0504, usage 0.962, E_pi|delta| 0.20 nats. METHOD.md's
    naive settings (weight 1, absolute tau 1, prior gradient into the codebook, no clipping or
    centring, a fast tracker on the current batch) gave l2 0.054 (+7%), usage 0.981 and
    E_pi|delta| 0.96 nats at this scale: noisier, but not the collapse METHOD.md saw with K=256
    over 600 steps, so this test pins the defaults rather than demonstrating that failure.
    """
    cfg = load_run_config(compose([
        "experiment=smoke", "device=cpu", "reuse_stages=false", "stage_a.steps=300", "stage_a.optim.lr=1e-3",
        "stage_b.steps=200", "stage_b.optim.lr=1e-3", "stage_c.steps=300", "stage_c.log_every=100",
        "data.train_subset=4096", "data.heldout_subset=512"]))
    prep = prepare(cfg)
    ctx = StageContext(device=torch.device("cpu"), precision="fp32", log=ScalarLog(tmp_path / "ab.jsonl"))
    tokenizer = stage_a(cfg, prep.data, ctx)
    target, _ = stage_b(cfg, prep.data, tokenizer, ctx)
    last = {}
    for method in ("two_stage", "wartok"):
        log = ScalarLog(tmp_path / f"{method}.jsonl")
        stage_c(dataclasses.replace(cfg, method=method), prep.data, copy.deepcopy(tokenizer), target,
                dataclasses.replace(ctx, log=log))
        log.close()
        last[method] = json.loads((tmp_path / f"{method}.jsonl").read_text().splitlines()[-1])
    assert last["wartok"]["l2"] <= 1.2 * last["two_stage"]["l2"], last
    assert abs(last["wartok"]["usage"] - last["two_stage"]["usage"]) <= 0.05, last
    assert last["wartok"]["delta_abs"] > 0  # the signal was live, not a silent no-op
