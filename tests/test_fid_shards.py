"""Paper-scale gFID: sharded extraction merges to the unsharded numbers; published .npz references.

Uses the stand-in extractor of test_metrics.py (registered with torch-fidelity on import), so the
same extraction path as Inception runs at a fraction of its cost.
"""
from __future__ import annotations

import hashlib
import pickle
import random

import numpy as np
import pytest
import torch

from test_metrics import CPU, add_noise, make_cfg, smooth_images
from wartok import fid_reference, fid_shards, metrics
from wartok.fid_reference import ReferenceKey
from wartok.metrics import MetricsConfig
from wartok.validate import ConfigError

TOTAL = 300


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    """(training images, samples): 400 smooth images; 300 others, duller, brighter and noisier."""
    samples = (smooth_images(TOTAL, seed=12).float() * 0.6 + 40).round().to(torch.uint8)  # duller, brighter
    return smooth_images(400, seed=11), add_noise(samples, 24.0)


def shards_of(samples: torch.Tensor, cfg: MetricsConfig, num_shards: int, tmp_path, tag=None):
    """Each shard computed on its own slice, saved and loaded back (the jobs' round trip)."""
    out = []
    for shard in range(num_shards):
        start, stop = fid_shards.shard_range(len(samples), shard, num_shards)
        stats = fid_shards.shard_statistics(samples[start:stop], cfg, CPU, shard, num_shards, len(samples), tag)
        out.append(fid_shards.load_shard(fid_shards.save_shard(tmp_path / f"s{shard}_of_{num_shards}.npz", stats)))
    return out


def test_shard_ranges_cover_the_set_once() -> None:
    for total, n in ((300, 7), (50000, 8), (5, 5)):
        ranges = [fid_shards.shard_range(total, i, n) for i in range(n)]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1
    with pytest.raises(ValueError, match="empty"):
        fid_shards.shard_range(3, 0, 4)


@pytest.mark.parametrize("num_shards", [1, 2, 7])
def test_sharded_gfid_equals_the_unsharded_computation(images, tmp_path, num_shards: int) -> None:
    train, samples = images
    cfg = make_cfg(tmp_path, kid_subset_size=100, kid_subsets=20)
    key = ReferenceKey("synthetic", "train", 16, len(train))
    whole = metrics.generation_metrics(samples, train, cfg, 3, CPU, key)
    shards = shards_of(samples, cfg, num_shards, tmp_path)
    random.Random(0).shuffle(shards)  # the merge does not depend on the order the jobs finished in
    merged = fid_shards.merged_generation_metrics(shards, lambda: pytest.fail("reference was cached"), cfg, 3, CPU, key)
    print(f"\n{num_shards} shards: gfid {merged['gfid']['value']:.9f} vs unsharded {whole['gfid']['value']:.9f}")
    assert whole["gfid"]["value"] > 1.0  # a real distance, so a relative tolerance means something
    assert merged["gfid"]["value"] == pytest.approx(whole["gfid"]["value"], rel=1e-6)
    assert merged["gkid"]["value"] == pytest.approx(whole["gkid"]["value"], rel=1e-6)
    assert merged["gkid"]["std"] == pytest.approx(whole["gkid"]["std"], rel=1e-6)
    assert merged["is"]["value"] == pytest.approx(whole["is"]["value"], rel=1e-6)
    for name in ("gfid", "gkid", "is"):
        same = {k: v for k, v in whole[name].items() if k not in ("value", "std")}
        assert {k: v for k, v in merged[name].items() if k not in ("value", "std", "shards")} == same, name
        assert merged[name]["shards"] == num_shards


def test_merge_refuses_missing_repeated_or_foreign_shards(images, tmp_path) -> None:
    _, samples = images
    cfg = make_cfg(tmp_path)
    shards = shards_of(samples, cfg, 3, tmp_path, tag={"checkpoint": "a"})
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        fid_shards.merge_statistics([shards[0], shards[2]])
    with pytest.raises(ValueError, match="once each"):
        fid_shards.merge_statistics([shards[0], shards[1], shards[1], shards[2]])
    foreign = shards_of(samples, cfg, 3, tmp_path / "other", tag={"checkpoint": "b"})
    with pytest.raises(ValueError, match="different settings"):
        fid_shards.merge_statistics([shards[0], foreign[1], shards[2]])
    with pytest.raises(ValueError, match="holds 100, got 99"):
        fid_shards.shard_statistics(samples[:99], cfg, CPU, 0, 3, TOTAL)


# ----------------------------------------------------------------------------- published .npz references
def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return str(path)


def test_npz_reference_gives_the_same_gfid_as_the_same_statistics(images, tmp_path) -> None:
    train, samples = images
    cfg = make_cfg(tmp_path)
    key = ReferenceKey("synthetic", "train", 16, len(train))
    from_train = metrics.generation_metrics(samples, train, cfg, 0, CPU, key)
    ref = fid_reference.reference_statistics(key, train, cfg, CPU)
    nhwc = train.permute(0, 2, 3, 1).numpy()  # the ADM evaluator stores its reference images NHWC
    path = write_npz(tmp_path / "VIRTUAL_synthetic.npz", mu=ref.mu, sigma=ref.sigma, arr_0=nhwc)
    with_npz = make_cfg(tmp_path, reference_npz=path)
    out = metrics.generation_metrics(samples, lambda: pytest.fail("training images loaded"), with_npz, 0, CPU, key)
    sha = hashlib.sha256(open(path, "rb").read()).hexdigest()
    assert out["gfid"]["value"] == pytest.approx(from_train["gfid"]["value"], rel=1e-6)
    assert out["gfid"]["reference"] == f"adm_npz:{sha}" and out["gfid"]["n_reference"] is None
    assert from_train["gfid"]["reference"] == "train split, 400 images (synthetic)"
    assert out["gfid"]["feature_network"] == from_train["gfid"]["feature_network"]
    assert out["gkid"]["value"] == pytest.approx(from_train["gkid"]["value"], rel=1e-6)  # KID against arr_0
    assert out["gkid"]["reference"] == f"adm_npz:{sha}"
    # without reference images there is no KID, and the entry says why
    bare = write_npz(tmp_path / "stats_only.npz", mu=ref.mu, sigma=ref.sigma)
    out = metrics.generation_metrics(samples, None, make_cfg(tmp_path, reference_npz=bare), 0, CPU, key)
    assert out["gfid"]["value"] == pytest.approx(from_train["gfid"]["value"], rel=1e-6)
    assert out["gkid"]["value"] is None and "arr_0" in out["gkid"]["reason"]
    # the sharded path takes the same reference
    shards = shards_of(samples, cfg, 2, tmp_path)
    merged = fid_shards.merged_generation_metrics(shards, None, make_cfg(tmp_path, reference_npz=bare), 0, CPU, key)
    assert merged["gfid"]["value"] == pytest.approx(from_train["gfid"]["value"], rel=1e-6)


def test_wrong_npz_files_are_refused_with_one_line(tmp_path) -> None:
    d = 32
    cases = {
        "not_a_zip.npz": None,
        "no_sigma.npz": dict(mu=np.zeros(d)),
        "bad_shapes.npz": dict(mu=np.zeros(d), sigma=np.zeros((d, d + 1))),
        "object_array.npz": dict(mu=np.array([{"x": 1}], dtype=object), sigma=np.zeros((1, 1))),
        "bad_images.npz": dict(mu=np.zeros(d), sigma=np.eye(d), arr_0=np.zeros((2, 3, 8, 8), np.float32)),
    }
    for name, arrays in cases.items():
        path = tmp_path / name
        if arrays is None:
            path.write_bytes(pickle.dumps({"mu": [0.0]}))
        else:
            np.savez(path, **arrays)  # an object array is pickled into the file: refused by its dtype
        with pytest.raises(ConfigError) as err:
            MetricsConfig(reference_npz=str(path))
        msg = str(err.value)
        assert msg.startswith(f"metrics.reference_npz={path}") and "\n" not in msg, msg
    with pytest.raises(ConfigError, match="does not exist"):
        MetricsConfig(reference_npz=str(tmp_path / "missing.npz"))
    # the right layout, the wrong feature network: 2048-d Inception statistics for 32-d features
    inception = write_npz(tmp_path / "inception.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    cfg = make_cfg(tmp_path, reference_npz=inception)
    with pytest.raises(ConfigError, match="2048-d"):
        metrics.generation_metrics(smooth_images(10), None, cfg, 0, CPU, ReferenceKey("s", "train", 16, 10))
