"""The paper's settings as launchable recipes, class conditioning, and ImageFolder data end to end.

Every recipe in configs/experiment/ that the README calls a paper setting composes, validates,
builds its models (on the meta device: no memory, no init cost) with the parameter counts its
header states, and those counts equal closed-form counts from the size registries. A tiny
class-conditional GPT learns per-class token distributions and classifier-free guidance skews its
samples toward the requested class. A real image tree (matplotlib's bundled photographs) runs
through `python -m wartok.sweep data=imagefolder` with a class-conditional wAR-Tok run, and its
run folder goes through the sharded gFID command line.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from test_metrics import ProjectionExtractor  # noqa: F401 (registers the stand-in extractor)
from test_vit1d import expected_parameters as vit1d_parameters
from wartok import fid_shards
from wartok.config import load_run_config, num_tokens
from wartok.models import GPT, TOKENIZERS, conv_tokenizer_config, generate, gpt_config, vit1d_tokenizer_config
from wartok.models.conv_tokenizer import ConvTokenizerConfig
from wartok.models.gpt import GPTConfig
from wartok.results import read_result
from wartok.sweep import CONFIG_DIR, PROJECT_ROOT, compose

# recipe -> (tokenizer preset, prior preset, tokens, K, classes, guidance scale)
RECIPES = {
    "cifar10": ("conv_base", "gpt_base", 64, 1024, 0, 1.0),
    "cifar10_vit1d": ("vit1d_base", "gpt_base", 64, 1024, 0, 1.0),
    "imagenet64": ("conv_base_f8", "gpt_base", 64, 4096, 1000, 1.5),
    "imagenet256": ("conv_base_f16", "gpt_base", 256, 16384, 1000, 2.0),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one thread. Two threads on a busy 2-core CPU spin against other work (a tiny
    GPT's decode step took 190 ms instead of 3 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- closed-form counts
def conv_parameters(cfg: ConvTokenizerConfig) -> int:
    """Conv tokenizer parameters from its config: GroupNorms (2 per width), 3x3 convs, 1x1 skips."""
    def conv(cin: int, cout: int, k: int = 3) -> int:
        return cin * cout * k * k + cout

    def blocks(cin: int, cout: int) -> tuple[int, int]:
        total = 0
        for _ in range(cfg.num_res_blocks):
            total += 2 * cin + conv(cin, cout) + 2 * cout + conv(cout, cout) + (conv(cin, cout, 1) if cin != cout else 0)
            cin = cout
        return total, cin

    chs, C, d = cfg.channels, cfg.in_channels, cfg.latent_dim
    enc, ch = conv(C, chs[0]), chs[0]
    for i, width in enumerate(chs):
        n, ch = blocks(ch, width)
        enc += n + (conv(ch, ch) if i < len(chs) - 1 else 0)  # stride-2 conv between levels
    enc += 2 * ch + conv(ch, d, 1)
    dec, ch = conv(d, chs[-1]), chs[-1]
    for i in reversed(range(len(chs))):
        n, ch = blocks(ch, chs[i])
        dec += n + (conv(ch, ch) if i > 0 else 0)  # upsampling conv
    dec += 2 * ch + conv(ch, C)
    return enc + dec + cfg.quantizer.codebook_size * d


def gpt_parameters(cfg: GPTConfig) -> int:
    """GPT parameters (no biases): token, class (+ null row) and position tables, 12C^2 + 2C per
    block (attention 4C^2, MLP 8C^2, two LayerNorm weights), the final LayerNorm and the head."""
    C, K = cfg.n_embd, cfg.vocab_size
    positions = cfg.block_size * C if cfg.pos == "learned" else 0
    return K * C + (cfg.num_classes + 1) * C + positions + cfg.n_layer * (12 * C * C + 2 * C) + C + C * K


def registry_tokenizer(preset: str):
    kind, size = preset.split("_", 1)
    return conv_tokenizer_config(size) if kind == "conv" else vit1d_tokenizer_config(size)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def header_millions(recipe: str) -> set[float]:
    """The parameter counts a recipe's header comment states ("35.6M parameters", "111.1M, ...")."""
    text = "".join(line for line in (CONFIG_DIR / "experiment" / f"{recipe}.yaml").read_text().splitlines(True)
                   if line.startswith("#"))
    return {float(m) for m in re.findall(r"(\d+\.\d)M\b", text)}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_composes_validates_and_builds_the_registry_models(recipe: str) -> None:
    tok_preset, prior_preset, tokens, K, classes, scale = RECIPES[recipe]
    run = load_run_config(compose([f"experiment={recipe}"]))
    assert run.name == recipe and run.precision == "bf16"
    assert run.tokenizer == registry_tokenizer(tok_preset)  # the registry is the source of the recipe's tokenizer
    assert num_tokens(run.tokenizer) == run.prior.block_size == tokens
    assert run.tokenizer.quantizer.codebook_size == run.prior.vocab_size == K
    assert run.prior.num_classes == classes and run.eval.sample_cfg_scale == scale
    assert run.data.image_size == run.tokenizer.image_size
    assert run.metrics.gfid_samples == 50000  # the paper's gFID sample count
    expected_prior = gpt_config(prior_preset.split("_", 1)[1], K, tokens, classes)
    for field in ("n_layer", "n_head", "n_embd", "pos"):
        assert getattr(run.prior, field) == getattr(expected_prior, field)

    with torch.device("meta"):  # the real modules, without allocating 100M+ parameters
        tokenizer = TOKENIZERS[run.tokenizer.name][1](run.tokenizer)
        prior = GPT(run.prior)
    n_tok, n_prior = count(tokenizer), count(prior)
    formula = conv_parameters(run.tokenizer) if run.tokenizer.name == "conv" else vit1d_parameters(run.tokenizer)
    print(f"\n{recipe}: tokenizer {tok_preset} {n_tok:,} parameters, {tokens} tokens, K={K}; "
          f"prior {prior_preset} {n_prior:,} parameters, {classes} classes")
    assert n_tok == formula and n_prior == gpt_parameters(run.prior)
    assert {round(n_tok / 1e6, 1), round(n_prior / 1e6, 1)} <= header_millions(recipe), \
        f"the header of {recipe}.yaml must state {n_tok / 1e6:.1f}M and {n_prior / 1e6:.1f}M"
    assert tokenizer.num_tokens == tokens


def test_gpt_large_is_registered_and_named_in_the_imagenet256_header() -> None:
    run = load_run_config(compose(["experiment=imagenet256", "prior=gpt_large"]))
    assert (run.prior.n_layer, run.prior.n_head, run.prior.n_embd, run.prior.num_classes) == (24, 16, 1024, 1000)
    with torch.device("meta"):
        n = count(GPT(run.prior))
    assert n == gpt_parameters(run.prior) and round(n / 1e6, 1) in header_millions("imagenet256")


def test_imagenet_recipes_need_the_data_root() -> None:
    from wartok.pipeline import prepare
    from wartok.validate import ConfigError

    with pytest.raises(ConfigError, match=r"data.root is required for data.name=imagenet"):
        prepare(load_run_config(compose(["experiment=imagenet64", "device=cpu", "metrics.enabled=false"])))


# ----------------------------------------------------------------------------- class conditioning
def conditional_gpt(num_classes: int = 4, seed: int = 0) -> GPT:
    cfg = gpt_config("tiny", vocab_size=8, block_size=4, num_classes=num_classes)
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def test_guidance_scale_zero_ignores_the_label() -> None:
    model = conditional_gpt()
    with torch.no_grad():
        model.cls_emb.weight.normal_()  # labels that matter at init
    draws = {}
    for scale in (0.0, 1.0):
        for label in (0, 3):
            draws[scale, label] = generate(model, 200, cond=torch.full((200,), label), cfg_scale=scale,
                                           generator=torch.Generator().manual_seed(5))
    assert torch.equal(draws[0.0, 0], draws[0.0, 3])  # u + 0 * (c - u) = the null class's logits
    assert not torch.equal(draws[1.0, 0], draws[1.0, 3])  # ... while the plain conditional samples differ


def test_guided_samples_skew_to_the_requested_class() -> None:
    """Tokens 2c and 2c+1 belong to class c: each token of a class-c sequence is one of them with
    probability 0.6 + 0.4 * 2/8 = 0.7, else uniform over the 8 tokens. A tiny GPT trained 300
    steps (label dropout 0.2) is sampled 500 times per class. Measured (this CPU, seeds fixed): the
    requested class's share of sampled tokens is 0.67-0.73 at scale 1 (the data's 0.7), 0.84-0.91
    at scale 3, and 0.22-0.28 for every class at scale 0 (the null class: no preference)."""
    K, T, C = 8, 4, 4
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(C, (4096,), generator=g)
    own = torch.rand(4096, T, generator=g) < 0.6
    tokens = torch.where(own, 2 * labels[:, None] + torch.randint(2, (4096, T), generator=g),
                         torch.randint(K, (4096, T), generator=g))
    model = conditional_gpt(C)
    model.config.cfg_dropout = 0.2
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        i = torch.randint(4096, (128,), generator=g)
        _, loss = model(tokens[i], cond=labels[i], targets=tokens[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    shares = {}
    for scale in (0.0, 1.0, 3.0):
        for c in range(C):
            s = generate(model, 500, cond=torch.full((500,), c), cfg_scale=scale,
                         generator=torch.Generator().manual_seed(1))
            shares[scale, c] = (torch.bincount(s.flatten() // 2, minlength=C).float() / s.numel()).tolist()
    print("\nclass shares (scale, class): " + ", ".join(f"{k}: {shares[k][k[1]]:.3f}" for k in shares))
    for c in range(C):
        plain, guided = shares[1.0, c], shares[3.0, c]
        assert max(range(C), key=lambda k: guided[k]) == c
        assert 0.6 < plain[c] < 0.8  # the trained model reproduces the class's 0.7
        assert guided[c] > 0.8 and guided[c] > plain[c] + 0.08  # guidance sharpens toward the class
        assert max(shares[0.0, c]) < 0.35  # scale 0: no class stands out
        assert shares[0.0, c] == shares[0.0, 0]  # ... and the label is ignored


# ----------------------------------------------------------------------------- ImageFolder end to end
SAMPLE_DATA = Path(__import__("matplotlib").get_data_path()) / "sample_data"
PHOTOS = {"hopper": "grace_hopper.jpg", "present": "Minduka_Present_Blue_Pack.png"}


def make_image_tree(root: Path, train: int = 24, val: int = 8) -> Path:
    """ROOT/{train,val}/{hopper,present}/*.png: random crops, flips and scales of matplotlib's two
    bundled photographs, one class per photograph."""
    rng = np.random.default_rng(0)
    for label, name in PHOTOS.items():
        photo = Image.open(SAMPLE_DATA / name).convert("RGB")
        w, h = photo.size
        for split, n in (("train", train), ("val", val)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                side = int(rng.integers(min(w, h) // 2, min(w, h) + 1))
                x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
                crop = photo.crop((x, y, x + side, y + side)).resize((48, 48), Image.BICUBIC)
                if rng.random() < 0.5:
                    crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
                crop.save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def imagefolder_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SAMPLE_DATA / PHOTOS["hopper"]).is_file():
        pytest.skip("matplotlib's sample photographs are not installed")
    base = tmp_path_factory.mktemp("imagefolder")
    root = make_image_tree(base / "images")
    out = base / "run"
    args = ["experiment=smoke", "data=imagefolder", f"data.root={root}", "data.image_size=32", "data.num_workers=0",
            "data.train_subset=0", "data.heldout_subset=0", "data.batch_size=16", "data.eval_batch_size=16",
            "method=wartok", "prior.num_classes=2", "eval.sample_cfg_scale=2.0", "metrics.enabled=false",
            "stage_a.steps=6", "stage_b.steps=4", "stage_c.steps=4", "stage_d.steps=4", "stage_b.batch_size=16",
            "stage_d.batch_size=16", "eval.num_grid_images=4", "device=cpu", f"hydra.run.dir={out}"]
    env = {**os.environ, "WARTOK_CACHE": str(base / "cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "wartok.sweep", *args], cwd=PROJECT_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_imagefolder_class_conditional_run_completes(imagefolder_run: Path) -> None:
    result = read_result(imagefolder_run / "result.json")
    assert result["status"] == "completed" and result["error"] is None
    cfg = result["config"]
    assert cfg["data.name"] == "imagefolder" and cfg["prior.num_classes"] == 2 and cfg["method"] == "wartok"
    metrics = result["metrics"]
    assert metrics["ar_loss"]["n"] == 2 * 8 * 64  # every held-out image's 64 tokens
    assert 0 < metrics["ar_loss"]["value"] < 1.5 * math.log(32)
    assert math.isfinite(metrics["psnr"]["value"]) and 0 < metrics["codebook_usage"]["value"] <= 1
    scalars = [json.loads(line) for line in (imagefolder_run / "scalars.jsonl").read_text().splitlines()]
    stage_c = [line for line in scalars if line["stage"] == "c"]
    assert stage_c and all(math.isfinite(line["tracker_ce"]) for line in stage_c)  # the labelled AR passes ran
    for name in ("tokenizer", "eval_prior", "samples"):
        assert (imagefolder_run / result["artifacts"][name]).is_file()


def test_sharded_gfid_of_a_run_folder(imagefolder_run: Path, tmp_path: Path) -> None:
    """The command line's shard and merge steps on a finished run (stand-in extractor)."""
    overrides = ["metrics.enabled=true", "metrics.feature_extractor=wartok-test-proj", "metrics.gfid_samples=20",
                 "metrics.reference_samples=0", f"metrics.cache_dir={tmp_path}", "metrics.kid_subset_size=10",
                 "metrics.kid_subsets=5", "device=cpu"]
    for shard in (1, 0):
        assert fid_shards.main(["shard", str(imagefolder_run), "--shard", str(shard), "--num-shards", "2", *overrides]) == 0
    assert fid_shards.main(["merge", str(imagefolder_run), "--num-shards", "2", *overrides]) == 0
    merged = json.loads((imagefolder_run / "gfid_shards" / "merged.json").read_text())["metrics"]
    gfid = merged["gfid"]
    assert gfid["n"] == 20 and gfid["shards"] == 2 and gfid["value"] > 0
    assert gfid["reference"] == "train split, 48 images (imagefolder)"
    assert gfid["feature_network"].startswith("wartok-test-proj layer proj")
    assert merged["gkid"]["n"] == 20 and math.isfinite(merged["gkid"]["value"])
    # a shard of another set (another sample count) is refused, not silently merged
    other = [*overrides, "metrics.gfid_samples=30"]
    assert fid_shards.main(["shard", str(imagefolder_run), "--shard", "1", "--num-shards", "2", *other]) == 0
    assert fid_shards.main(["merge", str(imagefolder_run), "--num-shards", "2", *overrides]) == 2
