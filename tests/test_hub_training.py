"""Train with `--dataset_name <Hub id>` on labeled images that `push_to_hub` uploaded to the test Hub server."""

import json

import numpy as np
import torch
from datasets import ClassLabel, DatasetDict
from training_helpers import run_main, tiny_argv

from diffusers_cfg.pipelines import ClassConditionalPipeline
from diffusers_cfg.training.data import load_labeled_images

# Names unlike the built-in "0" to "9", so that the checks below show which names travelled through the Hub.
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
NUM_TRAIN_IMAGES = 300
NUM_TEST_IMAGES = 50


def push_digits(repo_id: str) -> DatasetDict:
    """Upload a subset of builtin:digits labeled with DIGIT_NAMES through `DatasetDict.push_to_hub`, and return it."""
    digits = load_labeled_images("builtin:digits").splits
    subset = DatasetDict(
        train=digits["train"].select(range(NUM_TRAIN_IMAGES)),
        test=digits["test"].select(range(NUM_TEST_IMAGES)),
    )
    subset = subset.cast_column("label", ClassLabel(names=DIGIT_NAMES))
    subset.push_to_hub(repo_id)
    return subset


def test_train_on_pushed_hub_dataset(hub_server, tmp_path):
    repo_id = f"{hub_server.user}/digits-named"
    pushed = push_digits(repo_id)
    output_dir = tmp_path / "cfg-hub-digits"

    run_main(tiny_argv(output_dir, "--dataset_name", repo_id, "--max_train_steps", 3, "--checkpointing_steps", 100))

    # As on the Hub, `resolve` redirects a request for an LFS file such as a parquet shard to the storage listener.
    resolved = {
        record.path.rsplit("/", 1)[-1] for record in hub_server.server.requests
        if record.path.startswith(f"/datasets/{repo_id}/resolve/") and record.path.endswith(".parquet")
    }  # fmt: skip
    assert resolved == {"test-00000-of-00001.parquet", "train-00000-of-00001.parquet"}
    downloads = [
        record for record in hub_server.server.requests
        if record.listener == "cdn" and record.method == "GET"
        and record.path.startswith(f"/lfs-objects/dataset/{repo_id}/")
    ]  # fmt: skip
    assert len(downloads) == 2
    assert all(record.status == 200 for record in downloads)

    config = json.loads((output_dir / "training_config.json").read_text())
    assert config["dataset_name"] == repo_id
    assert config["num_classes"] == len(DIGIT_NAMES)
    assert config["resolution"] == 8
    assert config["channels"] == 1

    pipe = ClassConditionalPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.num_classes == len(DIGIT_NAMES)
    assert pipe.id2label == dict(enumerate(DIGIT_NAMES))
    assert pipe.unet.config.num_class_embeds == len(DIGIT_NAMES) + 1
    images = pipe(class_labels=["three", "seven"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np").images  # fmt: skip
    assert images.shape == (2, 8, 8, 1)
    assert np.isfinite(images).all()

    card = (output_dir / "README.md").read_text()
    assert f"datasets:\n- {repo_id}\n" in card, "the card metadata does not name the Hub dataset"
    assert "| 7 | seven |" in card
    assert json.loads((output_dir / "eval_results.json").read_text())["dataset"] == repo_id

    # The server stored what push_to_hub sent: both splits, in full, with the class names.
    loaded = load_labeled_images(repo_id).splits
    assert {name: len(split) for name, split in loaded.items()} == {"train": NUM_TRAIN_IMAGES, "test": NUM_TEST_IMAGES}
    assert loaded["train"].features["label"].names == DIGIT_NAMES
    assert loaded["train"]["label"] == pushed["train"]["label"]
