"""Every config composes into a typed RunConfig, and every bad setting fails before compute."""
from __future__ import annotations

from pathlib import Path

import pytest

from wartok.config import RunConfig, load_run_config, num_tokens
from wartok.pipeline import prepare
from wartok.sweep import CONFIG_DIR, PROJECT_ROOT, compose
from wartok.validate import ConfigError

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (PROJECT_ROOT / "sweeps").glob("*.yaml"))
GROUP_OPTIONS = [
    ["tokenizer=conv_tiny"], ["tokenizer=conv_small"], ["tokenizer=conv_base"],
    ["tokenizer=conv_base_f8"], ["tokenizer=conv_base_f16"], ["tokenizer=vit1d_tiny"], ["tokenizer=vit1d_base"],
    ["prior=gpt_tiny"], ["prior=gpt_small"], ["prior=gpt_base"], ["prior=gpt_large"],
    ["data=fashion_mnist"], ["data=cifar10"], ["data=imagefolder", "data.root=/nonexistent"],
]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str) -> None:
    run = load_run_config(compose([f"experiment={experiment}"]))
    assert isinstance(run, RunConfig)
    assert run.prior.vocab_size == run.tokenizer.quantizer.codebook_size
    assert run.prior.block_size == num_tokens(run.tokenizer)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_composes(sweep: str) -> None:
    assert isinstance(load_run_config(compose([f"sweeps={sweep}", "experiment=smoke"])), RunConfig)


@pytest.mark.parametrize("overrides", GROUP_OPTIONS, ids=lambda o: o[0])
def test_every_group_option_composes(overrides: list[str]) -> None:
    assert isinstance(load_run_config(compose(overrides)), RunConfig)


def test_experiment_values_reach_the_dataclasses() -> None:
    run = load_run_config(compose(["experiment=smoke", "tokenizer.quantizer.codebook_size=48", "stage_a.optim.lr=3e-4"]))
    assert run.tokenizer.quantizer.codebook_size == 48 and run.prior.vocab_size == 48
    assert run.stage_a.optim.lr == pytest.approx(3e-4)
    assert run.data.train_subset == 512 and run.name == "smoke"


def _error(overrides: list[str]) -> str:
    """The one-line message of the ConfigError these overrides raise, from config or preflight."""
    with pytest.raises(ConfigError) as info:
        prepare(load_run_config(compose(["experiment=smoke", *overrides])))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.name=mnist"], ["data.name", "fashion_mnist", "cifar10", "imagefolder"]),
        (["tokenizer.name=resnet"], ["tokenizer.name", "conv"]),
        (["data.root=/does/not/exist"], ["data.root", "/does/not/exist"]),
        (["tokenizer.quantizer.codebook_size=1"], ["codebook_size", ">= 2"]),
        (["tokenizer.image_size=30"], ["image_size", "downsample"]),
        (["tvc.likelihood.weight=-1"], ["tvc.likelihood.weight", "finite"]),
        (["tvc.posterior.beta=nan"], ["tvc.posterior.beta", "finite"]),
        (["stage_a.optim.lr=-0.001"], ["stage_a.optim.lr", "> 0"]),
        (["stage_d.optim.lr=inf"], ["stage_d.optim.lr", "finite"]),
        (["data.batch_size=0"], ["data.batch_size", ">= 1"]),
        (["stage_b.batch_size=0"], ["stage_b.batch_size", ">= 1"]),
        (["method=wartok_typo"], ["method", "two_stage"]),
        (["device=tpu"], ["device", "auto", "cpu", "cuda"]),
        (["method=wartok", "tvc.prior.tracker.refresh_every=0"], ["tvc.prior.tracker.refresh_every", ">= 1"]),
        (["method=wartok", "tvc.prior.tracker.refresh_steps=0"], ["tvc.prior.tracker.refresh_steps", ">= 1"]),
        (["method=wartok", "tvc.prior.target.mode=moving"], ["tvc.prior.target.mode", "frozen", "online", "ema"]),
        (["method=wartok", "tvc.prior.enabled=false"], ["tvc.prior.enabled=false", "method=wartok", "two_stage"]),
        (["method=joint", "tvc.prior.enabled=false"], ["tvc.prior.enabled=false", "method=joint"]),
        (["method=wartok", "tvc.prior.tracker.vocab_size=7"], ["tvc.prior.tracker.vocab_size=7", "codebook size 32"]),
        (["method=wartok", "tvc.prior.tracker.arch=small"], ["tvc.prior.tracker.arch=small", "init=target"]),
        (["method=wartok", "tvc.prior.tracker.arch=huge"], ["tvc.prior.tracker.arch", "tiny", "small", "base"]),
        (["tvc.prior.weight=-0.1"], ["tvc.prior.weight", ">= 0"]),
        (["tvc.prior.tau=0"], ["tvc.prior.tau", "> 0"]),
        (["tvc.prior.tau_mode=adaptive"], ["tvc.prior.tau_mode", "relative", "absolute"]),
        (["tvc.prior.ce.input=gumbel"], ["tvc.prior.ce.input", "st_onehot", "soft"]),
        (["tvc.prior.every=0"], ["tvc.prior.every", ">= 1"]),
        (["eval.sample_cfg_scale=-1"], ["eval.sample_cfg_scale", ">= 0"]),
        (["eval.sample_cfg_scale=2"], ["eval.sample_cfg_scale=2", "prior.num_classes=0"]),
        (["metrics.reference_npz=/nope.npz"], ["metrics.reference_npz=/nope.npz", "does not exist"]),
    ],
    ids=lambda v: v[0] if isinstance(v, list) and v and "=" in v[0] else "",
)
def test_bad_setting_names_setting_and_allowed_values(overrides: list[str], expected: list[str]) -> None:
    message = _error(overrides)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_unknown_key_in_a_node_fails_loudly() -> None:
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    # on the command line Hydra's structured merge refuses it at compose time
    with pytest.raises(ConfigCompositionException, match="codebok_size"):
        compose(["experiment=smoke", "tokenizer.quantizer.codebok_size=64"])
    # a plain (untyped) node, e.g. loaded from a saved YAML, is refused by load_run_config
    node = OmegaConf.to_container(compose(["experiment=smoke"]))
    node["tokenizer"]["quantizer"]["codebok_size"] = 64
    with pytest.raises(ConfigError, match="codebok_size"):
        load_run_config(node)
    node = OmegaConf.to_container(compose(["experiment=smoke"]))
    node["stage_a"]["stpes"] = 3
    with pytest.raises(ConfigError, match="stpes"):
        load_run_config(node)


def test_unknown_group_option_is_a_hydra_error_listing_options() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="conv_small"):
        compose(["tokenizer=vqgan"])
    with pytest.raises(MissingConfigException, match="gpt_small"):
        compose(["prior=llama"])
    with pytest.raises(MissingConfigException, match="fashion_mnist"):
        compose(["data=svhn"])


def test_prior_vocabulary_must_match_codebook() -> None:
    cfg = compose(["experiment=smoke", "+prior.vocab_size=7"])
    with pytest.raises(ConfigError, match="prior.vocab_size=7 must equal tokenizer.quantizer.codebook_size"):
        load_run_config(cfg)


def test_sweeps_group_is_mounted_from_the_top_level_folder() -> None:
    assert (PROJECT_ROOT / "sweeps").is_dir()
    assert Path(CONFIG_DIR).parent == PROJECT_ROOT
