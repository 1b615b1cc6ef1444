"""The run's typed configuration, and the one function that turns a Hydra node into it.

Modules never read the global config: `load_run_config` converts each node into its module's
dataclass. OmegaConf's structured merge rejects unknown or misspelled keys and wrong types, the
dataclasses' `__post_init__` reject bad values, and both surface as one-line `ConfigError`s
before any compute is spent.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wartok.checkpoint import CheckpointConfig
from wartok.data import DataConfig
from wartok.metrics import MetricsConfig
from wartok.models import TOKENIZERS, GPTConfig
from wartok.models.conv_tokenizer import PRESETS as CONV_PRESETS, conv_tokenizer_config
from wartok.models.gpt import PRESETS as GPT_PRESETS, gpt_config
from wartok.models.vit1d import PRESETS as VIT1D_PRESETS, vit1d_tokenizer_config
from wartok.tracker import tracker_gpt_config
from wartok.tvc import METHODS, PRIOR_KIND, TVCConfig
from wartok.validate import ConfigError, check_choice, check_finite, check_int, check_unit_interval

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
# Keys Hydra adds to the composed config that are not run settings.
NON_RUN_KEYS = ("hydra", "experiment", "sweeps", "local")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to min_lr_ratio * lr."""

    lr: float = 2e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class StageConfig:
    """The budget of one training stage (A: tokenizer, B: target prior, C: method, D: eval prior)."""

    steps: int = 1000
    log_every: int = 50
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class PriorStageConfig(StageConfig):
    """A prior-training stage (B, D): it draws its own batches of token sequences."""

    batch_size: int = 128


@dataclass
class EvalConfig:
    """Stage D's measurements on held-out images, identical for every method."""

    num_grid_images: int = 64          # reconstruction and sample PNG grids
    sample_temperature: float = 1.0
    sample_top_k: int = 0
    sample_top_p: float = 1.0
    # classifier-free guidance of a class-conditional prior's samples (1: none; 0: the null class only)
    sample_cfg_scale: float = 1.0
    # gFID sampling through the static KV cache, replayed as one CUDA graph per step on GPUs (the
    # same tokens as the dynamic cache; on the CPU it runs the static code eagerly). Off by
    # default until it has run on a GPU in this project's tests (tests/test_static_decode.py -m gpu).
    sample_cuda_graph: bool = False


@dataclass
class RunConfig:
    name: str = "run"
    method: str = "two_stage"
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False
    # conv weights and activations in NHWC: the layout cuDNN's bf16/TF32 tensor-core kernels
    # want (no transposes around every conv); on this project's CPU it measured neutral
    channels_last: bool = True
    reuse_stages: bool = True  # take stages A and B from the content-addressed stage cache
    cache_dir: Optional[str] = None  # the stage cache; None: $WARTOK_CACHE/stages or ~/.cache/wartok/stages
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: Any = None  # a tokenizer config, converted by its `name` (see TOKENIZERS)
    prior: Any = None  # a GPTConfig without vocab_size/block_size (the tokenizer sets them)
    tvc: TVCConfig = field(default_factory=TVCConfig)
    stage_a: StageConfig = field(default_factory=StageConfig)
    stage_b: PriorStageConfig = field(default_factory=PriorStageConfig)
    stage_c: StageConfig = field(default_factory=lambda: StageConfig(steps=0))
    stage_d: PriorStageConfig = field(default_factory=PriorStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tags: List[str] = field(default_factory=list)
    notes: Optional[str] = None

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("device", self.device, DEVICES)
        check_choice("precision", self.precision, PRECISIONS)
        check_int("seed", self.seed, 0)
        for stage in ("stage_a", "stage_b", "stage_c", "stage_d"):
            validate_stage(stage, getattr(self, stage))
        for stage in ("stage_b", "stage_d"):
            check_int(f"{stage}.batch_size", getattr(self, stage).batch_size, 1)
        check_int("eval.num_grid_images", self.eval.num_grid_images, 1)
        check_finite("eval.sample_temperature", self.eval.sample_temperature, minimum=0.0, strict=True)
        check_finite("eval.sample_cfg_scale", self.eval.sample_cfg_scale, minimum=0.0)
        # prior is None until load_run_config fills it in (dataclasses.replace runs this check again)
        if self.eval.sample_cfg_scale != 1.0 and self.prior is not None and self.prior.num_classes == 0:
            raise ConfigError(f"eval.sample_cfg_scale={self.eval.sample_cfg_scale!r} is not allowed with "
                              "prior.num_classes=0; guidance needs a class-conditional prior (or leave it at 1.0)")
        if PRIOR_KIND[self.method] != "none" and not self.tvc.prior.enabled:
            raise ConfigError(f"tvc.prior.enabled=false is not allowed with method={self.method} "
                              f"(its prior term is {PRIOR_KIND[self.method]}); for no prior term use method=two_stage")


def validate_stage(name: str, stage: StageConfig) -> None:
    check_int(f"{name}.steps", stage.steps, 0)
    check_int(f"{name}.log_every", stage.log_every, 1)
    check_finite(f"{name}.optim.lr", stage.optim.lr, minimum=0.0, strict=True)
    check_finite(f"{name}.optim.weight_decay", stage.optim.weight_decay, minimum=0.0)
    check_finite(f"{name}.optim.grad_clip", stage.optim.grad_clip, minimum=0.0)
    check_int(f"{name}.optim.warmup_steps", stage.optim.warmup_steps, 0)
    for beta in ("beta1", "beta2"):
        value = getattr(stage.optim, beta)
        check_finite(f"{name}.optim.{beta}", value, minimum=0.0)
        if value >= 1.0:
            raise ConfigError(f"{name}.optim.{beta}={value!r} is not allowed; it must be in [0, 1)")
    check_unit_interval(f"{name}.optim.min_lr_ratio", stage.optim.min_lr_ratio)


def _strict(schema: Any, node: Any, where: str) -> Any:
    """Merge `node` onto the dataclass `schema` and build it; unknown keys and bad types fail."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or where
        msg = str(err).splitlines()[0]
        raise ConfigError(f"invalid setting {where}.{key}: {msg}" if where else f"invalid setting {key}: {msg}") from None


def load_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Turn the composed Hydra config into a validated RunConfig (no compute happens here)."""
    node = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg.copy()
    OmegaConf.resolve(node)
    with _open(node):
        for key in NON_RUN_KEYS:
            node.pop(key, None)
        tok_node = node.pop("tokenizer", None)
        prior_node = node.pop("prior", None)
    if tok_node is None:
        raise ConfigError("tokenizer is not set; choose one of: " + ", ".join(tokenizer_options()))
    tokenizer = load_tokenizer_config(tok_node)
    run = _strict(RunConfig, node, "")
    prior = load_prior_config(prior_node or {}, tokenizer)
    if PRIOR_KIND[run.method] == "wgf":
        tracker_gpt_config(run.tvc.prior.tracker, prior)  # the tracker must share the codebook's vocabulary
    return dataclasses.replace(run, tokenizer=tokenizer, prior=prior)


def load_tokenizer_config(node: Any) -> Any:
    name = node.get("name", None)
    check_choice("tokenizer.name", name, TOKENIZERS)
    config_cls, _ = TOKENIZERS[name]
    return _strict(config_cls, node, "tokenizer")


def load_prior_config(node: Any, tokenizer: Any) -> GPTConfig:
    """The prior's vocabulary and length come from the tokenizer; a node that sets them must agree."""
    vocab, length = tokenizer.quantizer.codebook_size, num_tokens(tokenizer)
    try:
        prior = _strict(GPTConfig(vocab_size=vocab, block_size=length), node, "prior")
    except ConfigError as err:  # GPTConfig names its fields gpt.*; here the user's key is prior.*
        raise ConfigError(re.sub(r"\bgpt\.", "prior.", str(err))) from None
    if prior.vocab_size != vocab:
        raise ConfigError(f"prior.vocab_size={prior.vocab_size} must equal tokenizer.quantizer.codebook_size={vocab}")
    if prior.block_size != length:
        raise ConfigError(f"prior.block_size={prior.block_size} must equal the tokenizer's token count {length}")
    return prior


def num_tokens(tokenizer_cfg: Any) -> int:
    """T, the prior's sequence length: (image_size / downsample)^2 for conv, num_tokens for vit1d."""
    return tokenizer_cfg.num_tokens


def tokenizer_options() -> list[str]:
    return [f"conv_{size}" for size in CONV_PRESETS] + [f"vit1d_{size}" for size in VIT1D_PRESETS]


def register_configs() -> None:
    """Make the Python size registries Hydra options: `tokenizer=conv_small`, `tokenizer=vit1d_base`, `prior=gpt_base`.

    The registries stay the single source of truth; the prior nodes omit vocab_size and
    block_size because the tokenizer determines them.
    """
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    # The primary config extends this schema, so Hydra knows every key and its type at compose time.
    store.store(name="schema", node=RunConfig)
    for size in CONV_PRESETS:
        store.store(group="tokenizer", name=f"conv_{size}", node=conv_tokenizer_config(size))
    for size in VIT1D_PRESETS:
        store.store(group="tokenizer", name=f"vit1d_{size}", node=vit1d_tokenizer_config(size))
    for size in GPT_PRESETS:
        fields = dataclasses.asdict(gpt_config(size, vocab_size=2, block_size=1))
        fields.pop("vocab_size"), fields.pop("block_size")
        store.store(group="prior", name=f"gpt_{size}", node=fields)


class _open:
    """Temporarily lift OmegaConf's struct flag so keys can be popped."""

    def __init__(self, node: DictConfig) -> None:
        self.node = node

    def __enter__(self) -> DictConfig:
        OmegaConf.set_struct(self.node, False)
        return self.node

    def __exit__(self, *exc: object) -> None:
        OmegaConf.set_struct(self.node, True)
