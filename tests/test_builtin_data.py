"""The built-in offline datasets: sizes, splits, class names and the errors for missing or unknown sets."""

import os

import numpy as np
import pytest

from diffusers_cfg.training import data as data_module
from diffusers_cfg.training.data import detect_image_format, load_labeled_images


@pytest.mark.parametrize(
    ("name", "train_size", "test_size", "resolution"),
    [("builtin:digits", 1497, 300, 8), ("builtin:mnist-5k", 4500, 500, 28)],
)
def test_builtin_digit_sets(name, train_size, test_size, resolution):
    data = load_labeled_images(name)

    assert len(data.splits["train"]) == train_size
    assert len(data.splits["test"]) == test_size
    assert data.id2label == {i: str(i) for i in range(10)}
    assert detect_image_format(data) == (resolution, 1)
    test_labels = np.asarray(data.splits["test"][data.label_column])
    assert np.bincount(test_labels, minlength=10).tolist() == [test_size // 10] * 10
    # Real digits: mostly dark background, some bright strokes.
    pixels = np.asarray(data.splits["train"][0][data.image_column], dtype=np.float32) / 255
    assert 0.02 < pixels.mean() < 0.5
    assert pixels.max() > 0.9


def test_builtin_splits_are_disjoint_and_fixed():
    first = load_labeled_images("builtin:digits")
    second = load_labeled_images("builtin:digits")

    first_test = np.stack([np.asarray(image) for image in first.splits["test"][first.image_column]])
    second_test = np.stack([np.asarray(image) for image in second.splits["test"][second.image_column]])
    assert np.array_equal(first_test, second_test)
    train = {np.asarray(image).tobytes() for image in first.splits["train"][first.image_column]}
    # load_digits has a few duplicate images, so compare the share, not the exact set.
    overlap = sum(image.tobytes() in train for image in first_test)
    assert overlap <= 3


@pytest.mark.skipif(
    not os.path.isdir(data_module.FASHION_MNIST_DIR),
    reason=f"Debian's dataset-fashion-mnist is not installed ({data_module.FASHION_MNIST_DIR} is missing)",
)
def test_fashion_mnist_loads_from_debian_files():
    data = load_labeled_images("builtin:fashion-mnist")

    assert len(data.splits["train"]) == 60000
    assert len(data.splits["test"]) == 10000
    assert data.id2label[7] == "Sneaker"
    assert data.id2label[9] == "Ankle boot"
    assert detect_image_format(data) == (28, 1)


def test_fashion_mnist_missing_files_name_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "FASHION_MNIST_DIR", str(tmp_path))

    with pytest.raises(FileNotFoundError) as error:
        load_labeled_images("builtin:fashion-mnist")
    assert "apt-get install dataset-fashion-mnist" in str(error.value)
    assert str(tmp_path) in str(error.value)


def test_unknown_builtin_name_lists_choices():
    with pytest.raises(ValueError) as error:
        load_labeled_images("builtin:cifar")
    message = str(error.value)
    assert "'builtin:cifar'" in message
    for name in ("builtin:digits", "builtin:mnist-5k", "builtin:fashion-mnist"):
        assert name in message
