"""Data: synthetic images, an ImageFolder tree, and torchvision's CIFAR-10 code path.

Everything goes through the real torchvision datasets and ``pipeline.data.build``.
"""
from __future__ import annotations

import hashlib
import pickle
import pickletools

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from pipeline import data as data_mod
from pipeline import resize
from pipeline.config import Config
from pipeline.data import DataError, SyntheticCIFAR, build

from conftest import make_image_folder

CPU = torch.device("cpu")


def cfg_for(**values) -> Config:
    base = {"num_workers": "0", "image_size": "32", "batch_size": "4"}
    base.update({k: str(v) for k, v in values.items()})
    return Config.from_strings(base)


def independent_transform(size: int):
    # Written here, not imported: the notebook's Resize((size, size)) + ToTensor.
    return transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])


def all_batches(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# --- synthetic --------------------------------------------------------------------------------
def test_synthetic_data_is_deterministic_for_a_seed():
    a, b = SyntheticCIFAR(64, seed=3), SyntheticCIFAR(64, seed=3)
    assert np.array_equal(a.data, b.data)
    assert a.targets == b.targets


def test_synthetic_data_differs_between_seeds_and_between_train_and_test():
    train0 = SyntheticCIFAR(64, seed=0, train=True)
    assert not np.array_equal(train0.data, SyntheticCIFAR(64, seed=1, train=True).data)
    assert not np.array_equal(train0.data, SyntheticCIFAR(64, seed=0, train=False).data)


def test_synthetic_data_is_cifar_shaped_with_all_ten_classes():
    ds = SyntheticCIFAR(200, seed=0)
    assert len(ds) == 200
    assert ds.data.shape == (200, 32, 32, 3) and ds.data.dtype == np.uint8
    assert sorted(set(ds.targets)) == list(range(10))
    image, label = ds[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32) and image.mode == "RGB"
    assert label == ds.targets[0]
    assert ds.data.std() > 10  # not a constant image


def test_synthetic_classes_are_learnable_by_a_nearest_class_mean_classifier():
    train, test = SyntheticCIFAR(600, seed=0, train=True), SyntheticCIFAR(300, seed=0, train=False)
    x_train = train.data.reshape(len(train), -1).astype(np.float64)
    x_test = test.data.reshape(len(test), -1).astype(np.float64)
    y_train, y_test = np.array(train.targets), np.array(test.targets)
    means = np.stack([x_train[y_train == c].mean(0) for c in range(10)])
    distances = ((x_test[:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = (distances.argmin(1) == y_test).mean()
    assert accuracy > 0.5  # chance is 0.1

    # and the classes differ more from each other than images within a class do
    within = np.mean([((x_train[y_train == c] - means[c]) ** 2).sum(1).mean() for c in range(10)])
    between = np.mean([((means[a] - means[b]) ** 2).sum() for a in range(10) for b in range(a)])
    assert between > 0.5 * within


def test_build_synthetic_gives_resized_batches_in_the_unit_range():
    cfg = cfg_for(dataset="synthetic", synthetic_size=10, synthetic_test_size=6, image_size=40)
    data = build(cfg, CPU)
    assert data.steps_per_epoch == 3  # ceil(10 / 4): the last batch is kept
    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 40, 40) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    x_all, y_all = all_batches(data.train)
    assert x_all.shape[0] == 10
    assert len(data.test.dataset) == 6


def test_build_synthetic_test_split_matches_the_notebook_transform_pixel_for_pixel():
    cfg = cfg_for(dataset="synthetic", synthetic_size=8, synthetic_test_size=5, image_size=48, seed=2)
    data = build(cfg, CPU)
    x, y = all_batches(data.test)  # the test split is not shuffled
    reference = SyntheticCIFAR(5, seed=2, train=False)
    t = independent_transform(48)
    expected = torch.stack([t(Image.fromarray(im)) for im in reference.data])
    assert torch.equal(x, expected)
    assert y.tolist() == reference.targets


def test_training_order_is_shuffled_but_follows_from_the_seed():
    def first_epoch(seed):
        return all_batches(build(cfg_for(dataset="synthetic", synthetic_size=32,
                                         synthetic_test_size=4, seed=seed), CPU).train)[1]
    a, b = first_epoch(5), first_epoch(5)
    assert torch.equal(a, b)
    ordered = torch.tensor(SyntheticCIFAR(32, seed=5).targets)
    assert not torch.equal(a, ordered)  # shuffled
    assert sorted(a.tolist()) == sorted(ordered.tolist())


def test_every_epochs_order_is_the_same_with_and_without_worker_processes():
    # num_workers is a speed knob: it must not change what the network is trained on.
    # (data.py: "The order of every epoch follows from the seed alone".)
    def labels_per_epoch(num_workers, epochs=3):
        data = build(cfg_for(dataset="synthetic", synthetic_size=32, synthetic_test_size=4,
                             batch_size=8, seed=4, num_workers=num_workers), CPU)
        return [torch.cat([y for _, y in data.train]).tolist() for _ in range(epochs)]

    in_process, with_workers = labels_per_epoch("0"), labels_per_epoch("2")
    assert in_process[0] != in_process[1]  # reshuffled every epoch
    for epoch, (a, b) in enumerate(zip(in_process, with_workers)):
        assert a == b, f"epoch {epoch}: the order depends on num_workers"


# --- imagefolder ------------------------------------------------------------------------------
def test_build_imagefolder_reads_a_tiny_tree_with_the_notebook_transform(tmp_path):
    written = make_image_folder(tmp_path, per_class={"train": 2, "test": 1}, size=(20, 24))
    data = build(cfg_for(dataset="imagefolder", data_dir=tmp_path, batch_size=3), CPU)
    assert len(data.train.dataset) == 20 and len(data.test.dataset) == 10
    assert data.steps_per_epoch == 7

    x, y = next(iter(data.train))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    assert 0.0 <= x.min() and x.max() <= 1.0

    x_test, y_test = all_batches(data.test)
    assert y_test.tolist() == list(range(10))  # one image per class, in class order
    t = independent_transform(32)
    expected = torch.stack([t(Image.open(p).convert("RGB")) for p in written["test"]])
    assert torch.equal(x_test, expected)
    _, y_train = all_batches(data.train)
    assert sorted(y_train.tolist()) == sorted(list(range(10)) * 2)


def test_imagefolder_missing_directory_is_a_one_line_error_naming_data_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as excinfo:
        build(cfg_for(dataset="imagefolder", data_dir=missing), CPU)
    message = str(excinfo.value)
    assert message.startswith("data_dir:")
    assert str(missing) in message
    assert "\n" not in message


def test_imagefolder_empty_directory_is_a_one_line_error_naming_data_dir(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    with pytest.raises(DataError) as excinfo:
        build(cfg_for(dataset="imagefolder", data_dir=tmp_path), CPU)
    message = str(excinfo.value)
    assert message.startswith("data_dir:")
    assert str(tmp_path) in message
    assert "\n" not in message


def test_imagefolder_without_a_test_split_is_refused(tmp_path):
    make_image_folder(tmp_path, per_class={"train": 1})
    with pytest.raises(DataError) as excinfo:
        build(cfg_for(dataset="imagefolder", data_dir=tmp_path), CPU)
    assert "test" in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_imagefolder_with_other_than_ten_classes_is_refused(tmp_path):
    make_image_folder(tmp_path, classes=3, per_class={"train": 1, "test": 1})
    with pytest.raises(DataError) as excinfo:
        build(cfg_for(dataset="imagefolder", data_dir=tmp_path), CPU)
    message = str(excinfo.value)
    assert message.startswith("data_dir:") and "3" in message and "10" in message


# --- cifar10: torchvision's real code on a tiny fake cifar-10-batches-py -----------------------
def py2_style_pickle(obj, py2_strings: set[str]) -> bytes:
    """Pickle ``obj`` the way the real CIFAR-10 files are pickled (by Python 2).

    Their dict keys and label names are Python 2 ``str``, which Python 3 reads as ``bytes``
    (encoding='bytes', the b'data' everyone knows) or as ``str`` (torchvision passes
    encoding='latin1'). Python 3 would write them as unicode, so the strings in
    ``py2_strings`` are rewritten as protocol-2 SHORT_BINSTRING ops.
    """
    raw = pickle.dumps(obj, protocol=2)
    ops = list(pickletools.genops(raw))
    out = bytearray()
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(raw)
        if op.name == "BINUNICODE" and arg in py2_strings:
            encoded = arg.encode("latin1")
            assert len(encoded) < 256
            out += b"U" + bytes([len(encoded)]) + encoded
        else:
            out += raw[pos:end]
    return bytes(out)


LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]


def write_fake_cifar10(root, per_batch: int = 4, test_size: int = 6, seed: int = 0):
    """Write data_batch_1..5, test_batch and batches.meta in the real format; return
    the arrays written and the MD5 lists torchvision should check them against."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    md5 = {}
    arrays = {}

    def write(name, obj, strings):
        blob = py2_style_pickle(obj, strings)
        (folder / name).write_bytes(blob)
        md5[name] = hashlib.md5(blob).hexdigest()

    batches = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in batches:
        n = test_size if name == "test_batch" else per_batch
        pixels = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        filenames = [f"fake_{name}_{i}.png" for i in range(n)]
        entry = {"batch_label": f"{name} (fake)", "labels": labels, "data": pixels,
                 "filenames": filenames}
        write(name, entry, {"batch_label", "labels", "data", "filenames", entry["batch_label"],
                            *filenames})
        arrays[name] = (pixels, labels)
    meta = {"num_cases_per_batch": per_batch, "label_names": LABEL_NAMES, "num_vis": 3072}
    write("batches.meta", meta, {"num_cases_per_batch", "label_names", "num_vis", *LABEL_NAMES})
    return arrays, md5


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    arrays, md5 = write_fake_cifar10(tmp_path)
    # torchvision verifies each file against MD5 constants of the real release before it
    # unpickles anything. Pointing those constants at our files lets its real integrity
    # check, unpickling and reshaping run unchanged; nothing else is replaced.
    cifar = torchvision.datasets.CIFAR10
    monkeypatch.setattr(cifar, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]]
                                              for i in range(1, 6)])
    monkeypatch.setattr(cifar, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(cifar, "meta", {"filename": "batches.meta", "key": "label_names",
                                        "md5": md5["batches.meta"]})
    # Should a check fail, the download must fail fast and offline, as on a machine
    # without network: a local port that refuses connections.
    monkeypatch.setattr(cifar, "url", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path, arrays


def test_fake_cifar_files_are_in_the_real_pickle_format(fake_cifar10):
    root, arrays = fake_cifar10
    with open(root / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:
        entry = pickle.load(fh, encoding="bytes")
    assert set(entry) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert entry[b"data"].dtype == np.uint8 and entry[b"data"].shape == (4, 3072)
    assert np.array_equal(entry[b"data"], arrays["data_batch_1"][0])


def test_build_cifar10_yields_the_pixels_of_the_pickled_batches(fake_cifar10):
    root, arrays = fake_cifar10
    data = build(cfg_for(dataset="cifar10", data_dir=root, batch_size=4), CPU)
    assert data.train.dataset.classes == LABEL_NAMES
    assert len(data.train.dataset) == 20 and len(data.test.dataset) == 6
    assert data.steps_per_epoch == 5

    # At 32 px the resize keeps the image, so the tensor is exactly the stored bytes / 255,
    # with the CIFAR layout: each row of 3072 bytes is 1024 R, then 1024 G, then 1024 B.
    pixels, labels = arrays["test_batch"]
    x, y = all_batches(data.test)
    expected = torch.from_numpy(pixels.reshape(-1, 3, 32, 32)).float() / 255
    assert torch.equal(x, expected)
    assert y.tolist() == labels

    x_train, y_train = all_batches(data.train)
    all_labels = [v for i in range(1, 6) for v in arrays[f"data_batch_{i}"][1]]
    assert sorted(y_train.tolist()) == sorted(all_labels)
    stored = np.concatenate([arrays[f"data_batch_{i}"][0] for i in range(1, 6)])
    stored = torch.from_numpy(stored.reshape(-1, 3, 32, 32)).float() / 255
    # the same images, in a shuffled order
    key = lambda t: t.flatten().tolist()  # noqa: E731
    assert sorted(map(key, x_train)) == sorted(map(key, stored))


def test_build_cifar10_resizes_with_the_notebook_transform(fake_cifar10):
    root, arrays = fake_cifar10
    data = build(cfg_for(dataset="cifar10", data_dir=root, image_size=48), CPU)
    x, _ = all_batches(data.test)
    assert x.shape == (6, 3, 48, 48)
    pixels, _ = arrays["test_batch"]
    t = independent_transform(48)
    hwc = pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    expected = torch.stack([t(Image.fromarray(im)) for im in hwc])
    assert torch.equal(x, expected)


def test_a_tampered_cifar_file_is_refused_and_reported_as_missing_data(fake_cifar10):
    root, _ = fake_cifar10
    path = root / "cifar-10-batches-py" / "data_batch_3"
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError) as excinfo:
        build(cfg_for(dataset="cifar10", data_dir=root), CPU)
    assert str(excinfo.value).startswith("data_dir:")


def test_a_truncated_cifar_batch_file_is_refused_in_one_line_naming_data_dir(fake_cifar10):
    root, _ = fake_cifar10
    path = root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError) as excinfo:
        build(cfg_for(dataset="cifar10", data_dir=root), CPU)
    assert str(excinfo.value).startswith("data_dir:") and "\n" not in str(excinfo.value)


def test_missing_cifar10_without_network_is_one_line_naming_data_dir_and_the_alternatives(
        tmp_path, monkeypatch):
    # The real download code runs against a local port that refuses connections: the same
    # failure as a machine without network, and never a 170 MB download where there is one.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url",
                        "http://127.0.0.1:9/cifar-10-python.tar.gz")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as excinfo:
        build(cfg_for(dataset="cifar10", data_dir=data_dir), CPU)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith("data_dir:")
    assert str(data_dir) in message
    assert "dataset=imagefolder" in message
    assert "dataset=synthetic" in message
    assert "data_dir=" in message


def test_notebook_transform_is_resize_then_to_tensor_without_normalisation():
    t = data_mod.notebook_transform(40)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    assert torch.equal(t(image), independent_transform(40)(image))


# --- pil_resize: PIL's bilinear arithmetic in torch ops ------------------------------------------
def pil_reference(images_hwc: np.ndarray, size: int) -> torch.Tensor:
    # What transforms.Resize((size, size)) does to a PIL image, before ToTensor.
    return torch.stack([transforms.functional.pil_to_tensor(
        Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images_hwc])


def chw(images_hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("height, width, size", [
    (32, 32, 224), (32, 32, 33), (32, 32, 36), (32, 32, 112), (32, 32, 64),  # up
    (64, 64, 32), (37, 37, 32), (224, 224, 32), (33, 33, 32),                # down
    (20, 24, 33), (24, 20, 16),                                                # not square
    (32, 20, 32), (20, 32, 32),                                                # one axis kept
    (32, 32, 32), (1, 1, 5), (1, 7, 3), (5, 5, 1), (2, 2, 1)])                # edges
def test_pil_resize_equals_pils_bilinear_resize_bit_for_bit(height, width, size):
    rng = np.random.default_rng(height * 1000 + width * 10 + size)
    images = rng.integers(0, 256, (3, height, width, 3), dtype=np.uint8)
    got = resize.pil_resize(chw(images), size)
    assert got.dtype == torch.uint8 and got.shape == (3, 3, size, size)
    assert torch.equal(got, pil_reference(images, size))


def test_pil_resize_equals_pil_on_structured_and_saturated_images():
    # Smooth CIFAR-like images, and the extremes where clipping and rounding matter most:
    # black, white, a one-pixel 0/255 checkerboard and a ramp through every level.
    smooth = SyntheticCIFAR(8, seed=0).data
    checker = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)
    ramp = np.arange(32 * 32, dtype=np.int64).reshape(32, 32) % 256
    extremes = np.stack([np.zeros((32, 32)), np.full((32, 32), 255), checker, ramp])
    images = np.concatenate([smooth, np.repeat(extremes[..., None], 3, -1).astype(np.uint8)])
    for size in (224, 36, 112, 17):
        assert torch.equal(resize.pil_resize(chw(images), size), pil_reference(images, size)), size


def test_pil_resize_refuses_other_than_uint8_images_and_a_mis_shaped_out():
    with pytest.raises(ValueError, match="uint8"):
        resize.pil_resize(torch.rand(2, 3, 8, 8), 16)
    with pytest.raises(ValueError, match="out must be"):
        resize.pil_resize(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 16,
                            out=torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_pil_resize_gives_the_same_pixels_whatever_the_chunk_size(monkeypatch):
    images = chw(np.random.default_rng(1).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8))
    whole = resize.pil_resize(images, 48)
    for scratch in (1, 3 * 8 * 3 * (32 * 32 + 2 * 32 * 48 + 48 * 48)):  # chunks of 1; 3+3+1
        monkeypatch.setattr(resize, "SCRATCH_BYTES", scratch)
        out = torch.zeros(7, 3, 48, 48, dtype=torch.uint8)
        assert resize.pil_resize(images, 48, out=out) is out
        assert torch.equal(out, whole), scratch
    assert torch.equal(whole, pil_reference(images.permute(0, 2, 3, 1).numpy(), 48))
