"""Loading labeled images: batches and their types, data loader workers under spawn, channel conversion, and the
errors for datasets without a label column or with labels outside the declared classes."""

import argparse
import io
import logging
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from diffusers_cfg.training import train_cfg
from diffusers_cfg.training.data import (
    ImageTransform,
    channel_conversion_note,
    collate_examples,
    count_image_modes,
    detect_image_format,
    load_labeled_images,
    transformed_split,
)


def gray_image(value: int, size: int = 8) -> Image.Image:
    return Image.fromarray(np.full((size, size), value, dtype=np.uint8), mode="L")


def rgb_image(value: int, size: int = 8) -> Image.Image:
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[..., 0] = value
    return Image.fromarray(pixels, mode="RGB")


def write_parquet(path, columns: dict, features: Features) -> str:
    Dataset.from_dict(columns, features=features).to_parquet(str(path))
    return str(path)


def data_args(**overrides) -> argparse.Namespace:
    defaults = {"dataset_name": "builtin:digits", "image_column": None, "label_column": None,
                "dataset_cache_dir": None, "resolution": None, "num_channels": None, "train_batch_size": 16,
                "dataloader_num_workers": 0, "seed": 0}  # fmt: skip
    return argparse.Namespace(**{**defaults, **overrides})


@pytest.fixture
def accelerator():
    yield Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=0))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_batch_types_and_shapes():
    data = load_labeled_images("builtin:digits")
    split = transformed_split(data, "train", 8, 1)
    batch = collate_examples([split[i] for i in range(5)])
    assert set(batch) == {"pixel_values", "class_labels"}
    assert batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].shape == (5, 1, 8, 8)
    assert -1.0 <= batch["pixel_values"].min() < batch["pixel_values"].max() <= 1.0
    assert batch["class_labels"].dtype == torch.int64
    assert batch["class_labels"].shape == (5,)
    assert batch["class_labels"].tolist() == data.splits["train"]["label"][:5]


def test_transform_and_collate_pickle():
    # The spawn start method sends them to the workers by pickling.
    transform = pickle.loads(pickle.dumps(ImageTransform("image", "label", 8, 3)))
    assert transform({"image": [gray_image(255)], "label": [4]})["pixel_values"][0].shape == (3, 8, 8)
    assert pickle.loads(pickle.dumps(collate_examples)) is collate_examples


def first_batches(loader, count: int) -> list:
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


@pytest.mark.slow
def test_spawn_workers_give_same_batches(accelerator):
    _, serial_loader, _, _ = train_cfg.build_data(data_args(), accelerator)
    _, worker_loader, _, _ = train_cfg.build_data(data_args(dataloader_num_workers=2), accelerator)
    assert worker_loader.multiprocessing_context.get_start_method() == "spawn"
    serial_loader, worker_loader = accelerator.prepare(serial_loader, worker_loader)

    expected = first_batches(serial_loader, 3)
    found = first_batches(worker_loader, 3)
    assert len(found) == 3
    for batch, reference in zip(found, expected):
        assert batch["pixel_values"].dtype == torch.float32
        assert batch["pixel_values"].shape == (16, 1, 8, 8)
        assert batch["class_labels"].dtype == torch.int64
        assert batch["class_labels"].shape == (16,)
        assert torch.equal(batch["pixel_values"], reference["pixel_values"])
        assert torch.equal(batch["class_labels"], reference["class_labels"])


def test_rgb_images_convert_to_one_channel(tmp_path, accelerator, caplog):
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["dark", "bright"])})
    path = write_parquet(tmp_path / "rgb.parquet", {"image": [rgb_image(40 * i) for i in range(6)],
                                                    "label": [i % 2 for i in range(6)]}, features)  # fmt: skip
    data = load_labeled_images(path)
    assert detect_image_format(data) == (8, 3)

    caplog.set_level(logging.INFO)
    _, loader, _, channels = train_cfg.build_data(data_args(dataset_name=path, num_channels=1, train_batch_size=2),
                                                  accelerator)  # fmt: skip
    assert channels == 1
    assert "Converting images to 1 channel" in caplog.text
    assert "6 RGB" in caplog.text
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (2, 1, 8, 8)


def test_grayscale_images_convert_to_three_channels():
    data = load_labeled_images("builtin:digits")
    note = channel_conversion_note(data, 3, limit=50)
    assert note.startswith("Converting images to 3 channels (RGB)")
    assert "50 L" in note
    assert channel_conversion_note(data, 1) is None
    pixels = transformed_split(data, "train", 8, 3)[0]["pixel_values"]
    assert pixels.shape == (3, 8, 8)
    assert torch.equal(pixels[0], pixels[1])
    assert torch.equal(pixels[1], pixels[2])


def test_mixed_modes_are_reported(tmp_path):
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    images = [gray_image(10), rgb_image(20), gray_image(30), Image.new("LA", (8, 8))]
    data = load_labeled_images(write_parquet(tmp_path / "mixed.parquet", {"image": images, "label": [0, 1, 0, 1]},
                                             features))  # fmt: skip
    assert detect_image_format(data) == (8, 1)
    note = channel_conversion_note(data, 1)
    assert note is not None and note.endswith("the first 4 training images include 1 RGB")


def test_missing_label_column_lists_columns(tmp_path):
    features = Features({"image": ImageFeature(), "caption": Value("string")})
    columns = {"image": [gray_image(0)] * 2, "caption": ["a", "b"]}
    path = write_parquet(tmp_path / "captions.parquet", columns, features)
    with pytest.raises(ValueError, match=r"no label column .*image \(Image\), caption \(string\).*--label_column"):
        load_labeled_images(path)
    with pytest.raises(ValueError, match="--label_column 'caption' is not a ClassLabel or integer column"):
        load_labeled_images(path, label_column="caption")
    with pytest.raises(ValueError, match="--label_column 'class' is not a column"):
        load_labeled_images(path, label_column="class")


def test_labels_outside_declared_classes_are_named(tmp_path):
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    dataset = Dataset.from_dict({"image": [gray_image(0)] * 5, "label": [0, 1, 4, 1, 7]}, features=features)
    # Casting to fewer class names keeps the values: the parquet file then declares 2 classes and contains 4 and 7.
    path = str(tmp_path / "narrowed.parquet")
    dataset.cast_column("label", ClassLabel(names=["zero", "one"])).to_parquet(path)
    with pytest.raises(ValueError, match=r"outside the 2 declared classes \[0, 2\) in column 'label': 4, 7$"):
        load_labeled_images(path)


def test_negative_labels_are_named(tmp_path):
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    path = write_parquet(tmp_path / "negative.parquet", {"image": [gray_image(0)] * 3, "label": [0, -1, 2]}, features)
    with pytest.raises(ValueError, match=r"negative labels \[-1\]"):
        load_labeled_images(path)


def test_classes_without_examples_warn(tmp_path, caplog):
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    path = write_parquet(tmp_path / "gaps.parquet", {"image": [gray_image(0)] * 3, "label": [0, 3, 3]}, features)
    with caplog.at_level(logging.WARNING):
        data = load_labeled_images(path)
    assert data.num_classes == 4
    assert "['1', '2']" in caplog.text
    assert "no training examples" in caplog.text


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_struct_parquet(path, images: list, path_type: pa.DataType | None = None, column: str = "image") -> str:
    """Write images the way pandas and pyarrow store them: a plain struct {bytes, path}, without the datasets
    metadata that marks the column as an Image feature. The path field is a string unless `path_type` sets another type."""
    struct = pa.struct([("bytes", pa.binary()), ("path", path_type or pa.string())])
    entries = [{"bytes": data, "path": None} for data in images]
    table = pa.table({column: pa.array(entries, type=struct), "label": pa.array([i % 2 for i in range(len(images))])})
    pq.write_table(table, str(path))
    return str(path)


@pytest.mark.parametrize("path_type", [pa.string(), pa.null()], ids=["string-path", "null-path"])
def test_parquet_image_struct_is_cast(tmp_path, path_type):
    # A null path type is what pandas writes when every path is None.
    images = [png_bytes(gray_image(40 * i)) for i in range(4)]
    path = write_struct_parquet(tmp_path / "struct.parquet", images, path_type)
    assert b"huggingface" not in (pq.read_schema(path).metadata or {}), "the file must lack the datasets schema"

    data = load_labeled_images(path)

    assert data.image_column == "image"
    assert isinstance(data.splits["train"].features["image"], ImageFeature)
    assert detect_image_format(data) == (8, 1)
    batch = collate_examples([transformed_split(data, "train", 8, 1)[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 1, 8, 8)
    expected = torch.tensor([40.0 * i / 127.5 - 1.0 for i in range(4)])
    torch.testing.assert_close(batch["pixel_values"][:, 0, 0, 0], expected)
    assert batch["class_labels"].tolist() == [0, 1, 0, 1]


def test_parquet_image_struct_found_by_type(tmp_path):
    images = [png_bytes(rgb_image(40 * i)) for i in range(2)]
    path = write_struct_parquet(tmp_path / "photos.parquet", images, column="photo")
    data = load_labeled_images(path)
    assert data.image_column == "photo"
    assert detect_image_format(data) == (8, 3)


def test_parquet_struct_without_images_is_named(tmp_path):
    path = write_struct_parquet(tmp_path / "noise.parquet", [b"not an image", b"\x00\x01"])
    with pytest.raises(ValueError, match="column 'image' of .* has a bytes field, but its first entry is not an"):
        load_labeled_images(path)


def test_struct_without_bytes_is_rejected(tmp_path):
    table = pa.table({"image": pa.array([{"path": "a.png"}, {"path": "b.png"}]), "label": pa.array([0, 1])})
    path = str(tmp_path / "paths.parquet")
    pq.write_table(table, path)
    with pytest.raises(ValueError, match=r"no image column \(an Image feature or a struct with a bytes") as error:
        load_labeled_images(path)
    assert "image (struct of path)" in str(error.value)


def make_imagefolder(root, folders: dict) -> str:
    """Write an imagefolder: `count` gray PNGs into root/<folder> for each entry of `folders`."""
    for folder, count in folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            gray_image(40 * index).save(root / folder / f"{index}.png")
    return str(root)


@pytest.mark.parametrize("layout", ["only", "train/only"])
def test_imagefolder_with_one_class(tmp_path, layout):
    root = make_imagefolder(tmp_path / "images", {layout: 3})
    with pytest.raises(ValueError) as error:
        load_labeled_images(root)
    message = str(error.value)
    assert f"the imagefolder '{root}' has one class folder ('only')" in message
    assert "needs at least 2" in message
    assert "--label_column" not in message


@pytest.mark.parametrize("layout", [".", "train"])
def test_imagefolder_without_class_folders(tmp_path, layout):
    root = make_imagefolder(tmp_path / "images", {layout: 3})
    with pytest.raises(ValueError, match="has no label column, because its images are not in class folders") as error:
        load_labeled_images(root)
    assert "--label_column" not in str(error.value)


def test_imagefolder_with_two_classes(tmp_path):
    data = load_labeled_images(make_imagefolder(tmp_path / "images", {"cat": 2, "dog": 2}))
    assert data.id2label == {0: "cat", 1: "dog"}


@pytest.mark.parametrize(
    "labels, feature, type_name",
    [(["cat", "dog"], Value("string"), "string"), ([0.0, 1.0], Value("float32"), "float32")],
    ids=["strings", "floats"],
)
@pytest.mark.parametrize("given", [False, True], ids=["found", "flag"])
def test_label_column_of_wrong_type(tmp_path, labels, feature, type_name, given):
    features = Features({"image": ImageFeature(), "label": feature})
    path = write_parquet(tmp_path / "labels.parquet", {"image": [gray_image(0)] * 2, "label": labels}, features)
    with pytest.raises(ValueError) as error:
        load_labeled_images(path, label_column="label" if given else None)
    message = str(error.value)
    assert f"'label' {'is not a ClassLabel or integer column: it' if given else f'of {path!r}'} has type {type_name}" \
        in message
    assert "Class labels must be integers or a ClassLabel" in message
    assert "dataset.class_encode_column('label')" in message
    assert "Name the column with --label_column" not in message


def test_missing_images_are_named(tmp_path):
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    path = write_parquet(tmp_path / "holes.parquet", {"image": [gray_image(0), None, gray_image(9), None],
                                                      "label": [0, 1, 0, 1]}, features)  # fmt: skip
    with pytest.raises(ValueError) as error:
        load_labeled_images(path)
    message = str(error.value)
    assert f"2 row(s) of the train split of {path!r} have no image in column 'image'" in message
    assert "row(s) 1, 3." in message


def test_missing_struct_images_are_named(tmp_path):
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    good = png_bytes(gray_image(0))
    entries = [{"bytes": good, "path": None}, {"bytes": None, "path": None}, None]
    path = str(tmp_path / "struct-holes.parquet")
    pq.write_table(pa.table({"image": pa.array(entries, type=struct), "label": pa.array([0, 1, 0])}), path)
    with pytest.raises(ValueError, match=r"2 row\(s\) of the train split .* row\(s\) 1, 2\."):
        load_labeled_images(path)


@pytest.mark.parametrize("bad_row", [0, 2])
def test_unreadable_image_is_named(tmp_path, accelerator, bad_row):
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    images = [{"bytes": png_bytes(gray_image(0)), "path": None} for _ in range(4)]
    images[bad_row] = {"bytes": b"not an image", "path": None}
    path = write_parquet(tmp_path / "corrupt.parquet", {"image": images, "label": [0, 1, 0, 1]}, features)
    data = load_labeled_images(path)  # reads no pixels

    with pytest.raises(ValueError) as error:
        train_cfg.build_data(data_args(dataset_name=path, train_batch_size=2), accelerator)
    message = str(error.value)
    assert f"row {bad_row} of the train split of {path!r}, column 'image', contains 12 bytes" in message
    assert "PIL cannot read as an image" in message
    assert data.image_column == "image"


def test_missing_image_file_is_named(tmp_path):
    root = make_imagefolder(tmp_path / "images", {"cat": 2, "dog": 2})
    data = load_labeled_images(root)
    os.remove(os.path.join(root, "dog", "1.png"))
    with pytest.raises(ValueError, match=r"row 3 of the train split .* names the file '.*dog/1.png', which PIL cannot"):
        count_image_modes(data)
