"""wartok.data: real Fashion-MNIST from the Debian package, ImageFolder trees, loaders, errors."""
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from wartok import data
from wartok.data import DataConfig, build_data
from wartok.validate import ConfigError

HAVE_DEBIAN_FMNIST = data._has_files(data.DEBIAN_FASHION_MNIST, data.FASHION_MNIST_FILES, ".gz")
needs_fmnist = pytest.mark.skipif(not HAVE_DEBIAN_FMNIST,
                                  reason="apt-get install dataset-fashion-mnist (Debian) to run")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Keep the gunzipped cache off the home folder, shared by the tests of this session."""
    monkeypatch.setenv("WARTOK_CACHE", str(tmp_path_factory.getbasetemp() / "wartok_cache"))


def _fm(**kw):
    kw.setdefault("train_subset", 256)
    kw.setdefault("heldout_subset", 64)
    kw.setdefault("batch_size", 16)
    return DataConfig(name="fashion_mnist", **kw)


def _first_batch(bundle):
    return next(iter(bundle.train_loader))


# ----------------------------------------------------------------------------- Fashion-MNIST

@needs_fmnist
@pytest.mark.parametrize("channels", [3, 1])
def test_fashion_mnist_shapes_range_padding(channels):
    b = build_data(_fm(channels=channels), seed=0)
    assert (b.num_classes, b.image_size, b.channels) == (10, 32, channels)
    assert b.source == data.DEBIAN_FASHION_MNIST
    x, y = _first_batch(b)
    assert x.shape == (16, channels, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.max() == 1  # some pixel is white
    assert ((0 <= y) & (y <= 9)).all()
    # 28 -> 32: two rows/columns of background (-1) on each side
    for border in (x[..., :2, :], x[..., -2:, :], x[..., :, :2], x[..., :, -2:]):
        assert (border == -1).all()
    if channels == 3:
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    xh, yh = b.heldout[0]
    assert xh.shape == (channels, 32, 32) and isinstance(yh, int)


@needs_fmnist
def test_fashion_mnist_full_splits_and_odd_padding():
    b = build_data(DataConfig(image_size=29, channels=1), seed=0)
    assert (len(b.train), len(b.heldout), b.num_classes) == (60000, 10000, 10)
    assert len(b.train_loader) == 60000 // 64  # drop_last
    x, _ = b.train[0]
    assert x.shape == (1, 29, 29)
    assert (x[:, -1, :] == -1).all() and (x[:, :, -1] == -1).all()  # the odd pixel goes to the end
    labels = b.heldout.labels
    assert labels.min() == 0 and labels.max() == 9 and len(labels.unique()) == 10


@needs_fmnist
def test_fashion_mnist_cached_root_and_torchvision_layout(tmp_path):
    """The gunzipped cache is a torchvision root: pointing data.root at it reads it directly."""
    build_data(_fm(), seed=0)
    cache = data.cache_dir()
    assert sorted(os.listdir(os.path.join(cache, "FashionMNIST", "raw"))) == sorted(data.FASHION_MNIST_FILES)
    b = build_data(_fm(root=cache), seed=0)
    assert b.source == os.path.join(cache, "FashionMNIST", "raw")
    b_empty_root = build_data(_fm(root=str(tmp_path)), seed=0)  # an empty root falls back to the package
    assert b_empty_root.source == data.DEBIAN_FASHION_MNIST


@needs_fmnist
def test_loader_order_depends_only_on_seed():
    x0, y0 = _first_batch(build_data(_fm(), seed=0))
    x0b, y0b = _first_batch(build_data(_fm(), seed=0))
    x1, y1 = _first_batch(build_data(_fm(), seed=1))
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    assert not torch.equal(x0, x1)
    h0, _ = next(iter(build_data(_fm(), seed=0).heldout_loader))
    h1, _ = next(iter(build_data(_fm(), seed=1).heldout_loader))
    assert torch.equal(h0, h1)  # held-out order is fixed


@needs_fmnist
def test_subsets_are_fixed_and_nested():
    a = build_data(_fm(train_subset=100), seed=0).train
    b = build_data(_fm(train_subset=100), seed=7).train
    c = build_data(_fm(train_subset=200), seed=0).train
    assert len(a) == 100 and a.indices == b.indices  # independent of the run seed
    assert c.indices[:100] == a.indices
    assert a.indices != list(range(100))  # a permutation, not the first images


@needs_fmnist
def test_subset_and_batch_larger_than_split():
    with pytest.raises(ConfigError, match="data.heldout_subset"):
        build_data(_fm(heldout_subset=10001), seed=0)
    with pytest.raises(ConfigError, match="data.batch_size"):
        build_data(_fm(train_subset=10, batch_size=16), seed=0)


@needs_fmnist
def test_data_parallel_ranks_load_their_slices_of_the_global_batch():
    """world=2: data.batch_size stays the global batch; rank r loads the r-th half of each one."""
    from wartok.stream import BatchStream

    single = BatchStream(build_data(_fm(), seed=0).train_loader, seed=4)
    ranks = [BatchStream(build_data(_fm(), seed=0, rank=r, world=2).train_loader, seed=4) for r in range(2)]
    for _ in range(3):
        x, y = next(single)
        parts = [next(stream) for stream in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    assert len(ranks[0].loader) == len(single.loader) == 256 // 16
    with pytest.raises(ConfigError, match=r"data\.batch_size=16 is not allowed with 3 processes"):
        build_data(_fm(), seed=0, world=3)


def test_missing_fashion_mnist_names_paths_and_apt(tmp_path, monkeypatch):
    empty_pkg, empty_cache = tmp_path / "pkg", tmp_path / "cache"
    empty_pkg.mkdir()
    empty_cache.mkdir()
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(empty_pkg))
    monkeypatch.setenv("WARTOK_CACHE", str(empty_cache))
    with pytest.raises(ConfigError) as err:
        build_data(DataConfig(name="fashion_mnist"), seed=0)
    msg = str(err.value)
    assert "\n" not in msg
    assert "data.name=fashion_mnist" in msg and str(empty_pkg) in msg and str(empty_cache) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg


def test_cli_fetch_reports_found_data(tmp_path, capsys):
    fake = tmp_path / "FashionMNIST" / "raw"
    fake.mkdir(parents=True)
    for name in data.FASHION_MNIST_FILES:
        (fake / name).write_bytes(b"")
    assert data.main(["fetch", "fashion_mnist", "--root", str(tmp_path)]) == 0
    assert str(fake) in capsys.readouterr().out


def test_cli_fetch_fails_clearly_without_apt_or_network(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "pkg"))
    monkeypatch.setenv("WARTOK_CACHE", str(tmp_path / "empty_cache"))  # not the shared, filled cache
    monkeypatch.setattr(data.shutil, "which", lambda name: None)  # never run the real apt-get here

    def offline(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", offline)
    root = tmp_path / "new_root"
    assert data.main(["fetch", "fashion_mnist", "--root", str(root)]) == 1
    out = capsys.readouterr()
    assert "data.download=true" in out.err and str(root) in out.err and "apt-get install" in out.err


# ----------------------------------------------------------------------------- ImageFolder

def _make_tree(root, sizes=((40, 24), (24, 40)), classes=("cat", "dog"), splits=("train", "val")):
    """Non-square images: a plain colour per class, a white centre stripe to test the crop."""
    for split in splits:
        for k, cls in enumerate(classes):
            os.makedirs(root / split / cls, exist_ok=True)
            for i, (w, h) in enumerate(sizes * 2):
                img = np.zeros((h, w, 3), np.uint8)
                img[..., k] = 255
                img[h // 2 - 2:h // 2 + 2, w // 2 - 2:w // 2 + 2] = 255
                Image.fromarray(img).save(root / split / cls / f"{i}.png")


@pytest.mark.parametrize("name", ["imagefolder", "imagenet"])
def test_imagefolder_shapes_labels_crop(tmp_path, name):
    _make_tree(tmp_path)
    b = build_data(DataConfig(name=name, root=str(tmp_path), image_size=16, batch_size=4), seed=0)
    assert (len(b.train), len(b.heldout), b.num_classes, b.source) == (8, 8, 2, str(tmp_path))
    x, y = next(iter(b.heldout_loader))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert y.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # colour channel k is on for class k; the centre crop keeps the white centre
    assert (x[:4, 0] > 0.9).all() and (x[:4, 1, 0, 0] < -0.9).all()
    assert (x[4:, 1] > 0.9).all() and (x[4:, 0, 0, 0] < -0.9).all()
    assert (x[:, :, 8, 8] > 0.9).all()
    g = build_data(DataConfig(name=name, root=str(tmp_path), image_size=16, channels=1, batch_size=4), seed=0)
    assert g.heldout[0][0].shape == (1, 16, 16)


def test_imagefolder_mismatched_classes(tmp_path):
    _make_tree(tmp_path, splits=("train",))
    _make_tree(tmp_path, classes=("cat",), splits=("val",))
    with pytest.raises(ConfigError, match="different class folders"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path), batch_size=2), seed=0)


# ----------------------------------------------------------------------------- CIFAR-10

def test_cifar10_layout_read_through_torchvision(tmp_path, monkeypatch):
    """A fake cifar-10-batches-py (the md5 check is bypassed) exercises the tensor path."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [n for n, _ in torchvision.datasets.CIFAR10.train_list + torchvision.datasets.CIFAR10.test_list]
    for n in names:
        batch = {"data": rng.integers(0, 256, (5, 3072), dtype=np.uint8), "labels": list(range(5))}
        with open(folder / n, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    b = build_data(DataConfig(name="cifar10", root=str(tmp_path), batch_size=5), seed=0)
    assert (len(b.train), len(b.heldout), b.num_classes, b.source) == (25, 5, 10, str(folder))
    x, y = b.heldout[1]
    raw = torch.from_numpy(pickle.load(open(folder / "test_batch", "rb"))["data"][1]).view(3, 32, 32)
    assert torch.equal(x, raw.float() / 127.5 - 1) and y == 1
    grey = build_data(DataConfig(name="cifar10", root=str(tmp_path), batch_size=5, channels=1), seed=0)
    g, _ = grey.heldout[1]
    assert g.shape == (1, 32, 32) and g.min() >= -1 and g.max() <= 1


# ----------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("kw, setting", [
    (dict(name="mnist"), "data.name"),
    (dict(batch_size=0), "data.batch_size"),
    (dict(eval_batch_size=0), "data.eval_batch_size"),
    (dict(channels=2), "data.channels"),
    (dict(image_size=20), "data.image_size"),
    (dict(name="cifar10", image_size=64), "data.image_size"),
    (dict(num_workers=-1), "data.num_workers"),
    (dict(train_subset=-1), "data.train_subset"),
    (dict(heldout_subset=-5), "data.heldout_subset"),
    (dict(download="yes"), "data.download"),
    (dict(name="imagefolder", download=True), "data.download"),
    (dict(root=""), "data.root"),
])
def test_bad_settings_fail_in_config(kw, setting):
    with pytest.raises(ConfigError) as err:
        DataConfig(**kw)
    assert setting in str(err.value) and "\n" not in str(err.value)


def test_bad_paths_fail_before_loading(tmp_path):
    missing = tmp_path / "nope"
    cases = [
        (DataConfig(root=str(missing)), ["data.root", str(missing), "does not exist"]),
        (DataConfig(name="imagefolder"), ["data.root", "required"]),
        (DataConfig(name="imagenet", root=str(missing)), ["data.root", "does not exist"]),
        (DataConfig(name="cifar10"), ["data.root", "data.download=true"]),
        (DataConfig(name="cifar10", root=str(tmp_path)),
         ["data.root", str(tmp_path / "cifar-10-batches-py"), "data.download=true"]),
    ]
    (tmp_path / "train").mkdir()
    cases.append((DataConfig(name="imagefolder", root=str(tmp_path)), ["data.root", str(tmp_path / "val")]))
    for cfg, parts in cases:
        with pytest.raises(ConfigError) as err:
            build_data(cfg, seed=0)
        msg = str(err.value)
        assert "\n" not in msg and all(p in msg for p in parts), msg
