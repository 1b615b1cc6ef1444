"""FID/KID/IS through torch-fidelity: correctness of the distances, the reference cache, the entries.

Fast tests run a tiny deterministic stand-in extractor registered with torch-fidelity, so they
exercise the same extraction path as Inception without its cost; the slow test runs the real
Inception weights on real Fashion-MNIST images.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from wartok import fid_features, fid_reference, metrics
from wartok.data import TensorImages, _subset
from wartok.fid_reference import ReferenceKey
from wartok.metrics import MetricsConfig
from wartok.validate import ConfigError

CPU = torch.device("cpu")
ENTRY_KEYS = {"value", "n", "n_reference", "extractor", "weights_sha256", "torch_fidelity", "seed", "reliable", "note"}


class ProjectionExtractor(FeatureExtractorBase):
    """Stand-in extractor: 8x8 average pool, a fixed random projection to 32-d, 10 'logits'.
    ``calls`` counts forward batches across instances (the cache tests assert on it)."""

    calls = 0
    LAYERS = {"fid": "proj", "kid": "proj", "isc": "logits"}

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 8 * 8, 32, generator=g) / 8.0)
        self.register_buffer("head", torch.randn(32, 10, generator=g))

    @staticmethod
    def get_provided_features_list():
        return ("proj", "logits")

    @classmethod
    def get_default_feature_layer_for_metric(cls, metric):
        return cls.LAYERS[metric]

    @staticmethod
    def can_be_compiled():
        return False

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
        ProjectionExtractor.calls += 1
        feats = F.adaptive_avg_pool2d(x.float() / 127.5 - 1.0, 8).flatten(1) @ self.proj  # (B, 32)
        out = {"proj": feats, "logits": feats @ self.head}  # (B, 32), (B, 10)
        return tuple(out[k] for k in self.features_list)


class ProjectionNoLogits(ProjectionExtractor):
    LAYERS = {"fid": "proj", "kid": "proj"}

    @staticmethod
    def get_provided_features_list():
        return ("proj",)


for _name, _cls in (("wartok-test-proj", ProjectionExtractor), ("wartok-test-proj-nologits", ProjectionNoLogits)):
    if _name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(_name, _cls)


def make_cfg(tmp_path, **overrides) -> MetricsConfig:
    base = dict(feature_extractor="wartok-test-proj", cache_dir=str(tmp_path / "fid_stats"), batch_size=128,
                kid_subset_size=100, kid_subsets=20)
    return MetricsConfig(**{**base, **overrides})


def smooth_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 3, size, size): bicubic upsampling of random 4x4 colour grids."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * 255
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).round().clamp(0, 255).to(torch.uint8)


def add_noise(images: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noisy = images.float() + std * torch.randn(images.shape, generator=g)
    return noisy.round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------------- config, images
@pytest.mark.parametrize("field,value", [("enabled", "yes"), ("isc", 1), ("rfid_samples", -1), ("gfid_samples", 1),
                                         ("batch_size", 0), ("kid_subset_size", 1), ("num_threads", -2),
                                         ("cache_dir", ""), ("inception_weights", 3), ("feature_extractor", "nope")])
def test_config_rejects_bad_values_naming_the_setting(field, value):
    with pytest.raises(ConfigError) as err:
        MetricsConfig(**{field: value})
    msg = str(err.value)
    assert msg.startswith(f"metrics.{field}=") and "allowed" in msg and "\n" not in msg


def test_default_cache_dir_is_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("WARTOK_CACHE", str(tmp_path))
    assert MetricsConfig().stats_dir() == tmp_path / "fid_stats"


def test_to_uint8_inverts_the_loader_scaling_and_replicates_grey():
    u = torch.randint(0, 256, (5, 1, 7, 9), dtype=torch.uint8)
    out = metrics.to_uint8(u.float() / 127.5 - 1.0)  # the data loader's scaling
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 7, 9)
    assert torch.equal(out[:, 0], u[:, 0]) and torch.equal(out[:, 1], u[:, 0]) and torch.equal(out[:, 2], u[:, 0])
    assert torch.equal(metrics.to_uint8(torch.tensor([-3.0, 3.0]).view(1, 1, 1, 2))[0, 0, 0], torch.tensor([0, 255], dtype=torch.uint8))
    with pytest.raises(ValueError):
        metrics.to_uint8(torch.zeros(2, 2, 4, 4))


def test_subset_indices_are_fixed_and_distinct():
    a, b = metrics.subset_indices(1000, 100), metrics.subset_indices(1000, 100)
    assert a == b and len(set(a)) == 100 and a != list(range(100))
    assert metrics.subset_indices(10, 0) == list(range(10))
    held_out = TensorImages(torch.zeros(1000, 1, 2, 2, dtype=torch.uint8), torch.zeros(1000), 2, 3)
    assert _subset(held_out, 100, "data.heldout_subset").indices == a  # the data module's subsets agree


# ----------------------------------------------------------------------------- distances
def scipy_frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """Independent FID: numpy mean/cov and scipy's matrix square root."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_distance_matches_an_independent_computation():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(16, 16))
    f1 = rng.normal(size=(400, 16)) @ mix
    f2 = (rng.normal(size=(300, 16)) * 1.3 + 0.5) @ mix.T
    mu1, s1 = fid_reference.feature_statistics(torch.from_numpy(f1).float())
    mu2, s2 = fid_reference.feature_statistics(torch.from_numpy(f2).float())
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    ref = scipy_frechet(f1.astype(np.float32).astype(np.float64), f2.astype(np.float32).astype(np.float64))
    assert ref > 1.0 and abs(ours - ref) / ref < 1e-4


def test_frechet_distance_of_a_feature_set_with_itself_is_zero():
    f = torch.from_numpy(np.random.default_rng(1).normal(size=(500, 32))).float()
    mu, sigma = fid_reference.feature_statistics(f)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-3


def test_fid_and_kid_grow_monotonically_with_noise(tmp_path):
    cfg = make_cfg(tmp_path)
    real = smooth_images(600)
    key = ReferenceKey("synthetic", "heldout", 16, len(real))
    results = [metrics.reconstruction_metrics(add_noise(real, std), real, cfg, 0, CPU, key)
               for std in (0.0, 16.0, 48.0, 128.0)]
    fids = [r["rfid"]["value"] for r in results]
    kids = [r["rkid"]["value"] for r in results]
    assert abs(fids[0]) < 1e-3, fids  # identical images: identical features
    assert all(a < b for a, b in zip(fids, fids[1:])), fids
    assert all(a < b for a, b in zip(kids, kids[1:])), kids
    assert fids[-1] > 10 * fids[1] and kids[-1] > kids[0] + 0.01  # clear growth, not rounding


# ----------------------------------------------------------------------------- reference cache
def test_reference_cache_hit_miss_and_corrupt_file(tmp_path):
    cfg = make_cfg(tmp_path)
    images = smooth_images(300, seed=3)
    key = ReferenceKey("synthetic", "train", 16, len(images))
    start = ProjectionExtractor.calls
    first = fid_reference.reference_statistics(key, images, cfg, CPU)
    batches = ProjectionExtractor.calls - start
    assert batches == 3  # 300 images in batches of 128

    calls = ProjectionExtractor.calls
    loader_calls = []
    second = fid_reference.reference_statistics(key, lambda: loader_calls.append(1) or images, cfg, CPU)
    assert ProjectionExtractor.calls == calls and not loader_calls  # a hit neither loads nor extracts
    assert np.array_equal(first.mu, second.mu) and np.array_equal(first.sigma, second.sigma)
    assert np.array_equal(first.kid_features, second.kid_features) and second.n == 300

    other = dataclasses.replace(key, split="heldout")  # a changed key extracts again
    fid_reference.reference_statistics(other, images, cfg, CPU)
    assert ProjectionExtractor.calls == calls + batches

    ex = fid_features.load_extractor(cfg, CPU)
    path = fid_reference.reference_path(key, ex, cfg)
    assert path.is_file() and path.parent == tmp_path / "fid_stats"
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temp files
    path.write_bytes(b"not an npz file")
    calls = ProjectionExtractor.calls
    with pytest.warns(RuntimeWarning, match="rebuilding"):
        rebuilt = fid_reference.reference_statistics(key, images, cfg, CPU)
    assert ProjectionExtractor.calls == calls + batches
    assert np.allclose(rebuilt.mu, first.mu) and np.load(path, allow_pickle=False)["n"] == 300


def test_reference_file_with_a_foreign_key_is_rebuilt(tmp_path):
    cfg = make_cfg(tmp_path)
    images = smooth_images(50, seed=4)
    key = ReferenceKey("synthetic", "train", 16, 50)
    ref = fid_reference.reference_statistics(key, images, cfg, CPU)
    path = fid_reference.reference_path(key, fid_features.load_extractor(cfg, CPU), cfg)
    foreign = dataclasses.replace(ref, identity=json.dumps({"dataset": "other"}))
    fid_reference._save_reference(path, foreign)
    with pytest.warns(RuntimeWarning, match="do not match"):
        assert fid_reference.reference_statistics(key, images, cfg, CPU).identity == ref.identity


def test_reference_count_must_match_the_key(tmp_path):
    with pytest.raises(ValueError, match="10 images"):
        fid_reference.reference_statistics(ReferenceKey("s", "train", 16, 10), smooth_images(12), make_cfg(tmp_path), CPU)


# ----------------------------------------------------------------------------- entries
def test_generation_entries_flag_small_samples_and_compute_is(tmp_path):
    cfg = make_cfg(tmp_path, kid_subset_size=1000)
    train, samples = smooth_images(400, seed=5), add_noise(smooth_images(200, seed=6), 10.0)
    out = metrics.generation_metrics(samples, lambda: train, cfg, 7, CPU, ReferenceKey("synthetic", "train", 16, 400))
    assert set(out) == {"gfid", "gkid", "is"}
    for entry in out.values():
        assert ENTRY_KEYS <= set(entry) and entry["n"] == 200 and entry["seed"] == 7
        assert entry["extractor"] == "wartok-test-proj" and len(entry["weights_sha256"]) == 64
        json.dumps(entry)  # result.json-ready
    gfid = out["gfid"]
    assert gfid["value"] > 0 and gfid["n_reference"] == 400 and gfid["reliable"] is False and "2048" in gfid["note"]
    assert out["gkid"]["subset_size"] == 200 and out["gkid"]["reliable"] is False and "clamped" in out["gkid"]["note"]
    assert out["is"]["value"] >= 1.0 and out["is"]["splits"] == 10  # the stand-in has a logits layer


def test_is_is_none_with_a_reason_without_logits_or_when_disabled(tmp_path):
    train, samples = smooth_images(100, seed=8), smooth_images(100, seed=9)
    key = ReferenceKey("synthetic", "train", 16, 100)
    for cfg, words in ((make_cfg(tmp_path, feature_extractor="wartok-test-proj-nologits"), "no logits"),
                       (make_cfg(tmp_path, isc=False), "metrics.isc=false")):
        entry = metrics.generation_metrics(samples, train, cfg, 0, CPU, key)["is"]
        assert entry["value"] is None and entry["n"] == 100 and words in entry["reason"]


def test_reconstruction_needs_one_reconstruction_per_reference_image(tmp_path):
    with pytest.raises(ValueError, match="reconstructions"):
        metrics.reconstruction_metrics(smooth_images(5), smooth_images(6), make_cfg(tmp_path), 0, CPU,
                                       ReferenceKey("s", "heldout", 16, 6))


def test_num_threads_is_applied_while_extracting_and_restored(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(ProjectionExtractor, "forward", lambda self, x: (seen.append(torch.get_num_threads()),
                                                                        (x.float().flatten(1)[:, :32],))[1])
    before = torch.get_num_threads()
    cfg = make_cfg(tmp_path, feature_extractor="wartok-test-proj-nologits", num_threads=1)
    fid_features.extract_features(smooth_images(4), fid_features.load_extractor(cfg, CPU), cfg)
    assert seen == [1] and torch.get_num_threads() == before


def test_extraction_rate_times_the_configured_extractor(tmp_path):
    calls = ProjectionExtractor.calls
    rate = metrics.extraction_rate(CPU, n=16, batch_size=4, cfg=make_cfg(tmp_path))
    assert rate > 0 and ProjectionExtractor.calls == calls + 1 + 4  # one warm-up batch, then 16 / 4


# ----------------------------------------------------------------------------- real Inception
@pytest.mark.slow
def test_inception_fid_train_vs_test_is_far_below_train_vs_noise(tmp_path):
    from wartok.data import DataConfig, build_data

    cfg = MetricsConfig(cache_dir=str(tmp_path), batch_size=50)
    try:
        ex = fid_features.load_extractor(cfg, CPU)
    except ConfigError as e:
        pytest.skip(f"Inception weights unavailable: {e}")
    data = build_data(DataConfig(name="fashion_mnist", image_size=32), seed=0)
    n = 200
    train, test = metrics.dataset_uint8(data.train, n), metrics.dataset_uint8(data.heldout, n)
    noise = torch.randint(0, 256, train.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    key = ReferenceKey("fashion_mnist", "train", 32, n)
    vs_test = metrics.generation_metrics(test, train, cfg, 0, CPU, key)
    vs_noise = metrics.generation_metrics(noise, train, cfg, 0, CPU, key)
    f_test, f_noise = vs_test["gfid"]["value"], vs_noise["gfid"]["value"]
    print(f"\nInception FID (N={n} each): train vs test {f_test:.2f}, train vs uniform noise {f_noise:.2f}")
    assert np.isfinite(f_test) and 0 < f_test < 0.4 * f_noise
    assert vs_test["gkid"]["value"] < vs_noise["gkid"]["value"]
    assert vs_test["gfid"]["reliable"] is False and vs_test["gfid"]["weights_sha256"] == ex.weights_sha256
    if ex.isc_unavailable:  # the built file: no logits, so no Inception Score, ever
        assert vs_test["is"]["value"] is None and "logits" in vs_test["is"]["reason"]
    # The CPU speed-up (BN folded into convs, channels_last) keeps torch-fidelity's features.
    plain = fid_features.load_extractor(cfg, CPU, fast_cpu=False)
    fast_f = fid_features.extract_features(test[:8], ex, cfg)["2048"]
    plain_f = fid_features.extract_features(test[:8], plain, cfg)["2048"]
    assert (fast_f - plain_f).abs().max() < 1e-4
