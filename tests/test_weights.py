"""Inception weights: resolution order, safe loading (no pickle code runs), clear errors, the build check."""
from __future__ import annotations

import os

import pytest
import torch

from wartok import fid_features, metrics, weights
from wartok.validate import ConfigError


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: what a malicious .pth does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def tiny_weights(path, fc_finite: bool = False):
    """A file with the keys load_state_dict_safely checks for (not a usable network)."""
    fc = torch.zeros(3, 2) if fc_finite else torch.full((3, 2), float("nan"))
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "Mixed_7c.branch_pool.conv.weight": torch.zeros(1),
                "fc.weight": fc, "fc.bias": fc[:, 0].clone()}, path)
    return path


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty cache, no env var, and no torch-fidelity file or download."""
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(weights, "_torch_fidelity_file", lambda allow_download: None)
    return tmp_path


def test_a_code_running_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": Payload(marker)}, evil)
    with pytest.raises(ConfigError, match="refused") as err:
        weights.load_state_dict_safely(evil)
    assert weights.BUILD_COMMAND in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        weights.resolve_inception_weights(str(evil))
    with pytest.raises(ConfigError):  # the metrics path resolves (and so checks) weights before torch-fidelity loads them
        fid_features.load_extractor(metrics.MetricsConfig(inception_weights=str(evil)), torch.device("cpu"))
    with weights.force_weights_only_load(), pytest.raises(Exception):  # torch-fidelity's own weights_only=False load
        torch.load(evil, weights_only=False)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # control: unprotected, the payload is real
    assert marker.exists()


def test_force_weights_only_load_overrides_and_restores_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save(Payload(marker), evil)
    with weights.force_weights_only_load():
        assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ
        with pytest.raises(Exception, match="(?i)weights.only"):
            torch.load(evil, weights_only=False)
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_files_that_are_not_inception_state_dicts_are_refused(tmp_path):
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    (tmp_path / "junk.pth").write_bytes(b"\x00junk")
    for name in ("list.pth", "other.pth", "junk.pth"):
        with pytest.raises(ConfigError, match="refused"):
            weights.load_state_dict_safely(tmp_path / name)


def test_missing_weights_error_names_the_build_command(offline_cache):
    with pytest.raises(ConfigError) as err:
        weights.resolve_inception_weights()
    msg = str(err.value)
    assert weights.BUILD_COMMAND in msg and weights.SETTING in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="no such file") as err:
        weights.resolve_inception_weights(str(offline_cache / "absent.pth"))
    assert weights.BUILD_COMMAND in str(err.value)


def test_resolution_order_setting_then_env_then_built_file(offline_cache, monkeypatch):
    setting, env = tiny_weights(offline_cache / "a.pth"), tiny_weights(offline_cache / "b.pth", fc_finite=True)
    built = weights.built_weights_path()
    built.parent.mkdir(parents=True)
    tiny_weights(built)
    built.with_name(built.name + ".sha256").write_text(f"{weights.sha256_file(built)}  {built.name}\n")
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(env))
    assert weights.resolve_inception_weights(str(setting))[0] == str(setting.resolve())
    path, sha = weights.resolve_inception_weights()
    assert path == str(env.resolve()) and sha == weights.sha256_file(env)
    monkeypatch.delenv(weights.WEIGHTS_ENV)
    assert weights.resolve_inception_weights()[0] == str(built.resolve())
    built.with_name(built.name + ".sha256").write_text("0" * 64 + "\n")  # a file changed after it was built
    with pytest.raises(ConfigError, match="--force"):
        weights.resolve_inception_weights()


def test_inception_score_availability_follows_the_logits_layer(tmp_path):
    assert "logits" in weights.weights_info(tiny_weights(tmp_path / "nan.pth")).isc_unavailable
    assert weights.weights_info(tiny_weights(tmp_path / "ok.pth", fc_finite=True)).isc_unavailable is None


@pytest.mark.slow
def test_built_weights_reproduce_the_torchscript_features(tmp_path):
    out = tmp_path / "inception.pth"
    path, sha, diff = weights.build_weights(out, force=True, verbose=False)
    assert diff is not None and diff < weights.MAX_ABS_DIFF
    assert sha == weights.sha256_file(out) and weights.weights_info(path).isc_unavailable == weights.NO_LOGITS_REASON
    assert weights.build_weights(out, verbose=False)[2] is None  # the second call only checks
