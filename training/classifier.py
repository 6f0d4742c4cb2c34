"""A small CNN classifier that scores generated samples, trained once per dataset and cached on disk.

Its accuracy on the test split is the ceiling for the class accuracy of generated samples, and its penultimate
layer gives the features for classifier FID and precision/recall. Those features are specific to this network:
classifier FID is not comparable with Inception FID.
"""

import hashlib
import json
import logging
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffusers_cfg.training.data import LabeledImages, split_as_tensors

logger = logging.getLogger(__name__)

# Bump when the architecture or training recipe changes, so cached classifiers are retrained.
CLASSIFIER_VERSION = 1
CACHE_ENV = "DIFFUSERS_CFG_CACHE"


def cache_dir() -> str:
    """Folder for cached classifiers: `$DIFFUSERS_CFG_CACHE`, else `~/.cache/diffusers_cfg`."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "diffusers_cfg")
    return os.environ.get(CACHE_ENV, default)


class SampleClassifier(nn.Module):
    """Two conv stages and a 128-d feature layer; input images in [-1, 1], any size from 8x8 up."""

    def __init__(self, channels: int, num_classes: int, width: int = 16, feature_dim: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Dropout(0.25),
            nn.Linear(2 * width * 16, feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """Penultimate-layer features (N, 128), in evaluation mode."""
        self.eval()
        return torch.cat([self.features(chunk.float()) for chunk in images.split(batch_size)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        self.eval()
        return torch.cat([self(chunk.float()).argmax(dim=1) for chunk in images.split(batch_size)])


def _cache_key(data: LabeledImages, resolution: int, channels: int) -> str:
    train = data.splits["train"]
    # Built-in sets are fixed by name; other sources are identified by the datasets library's fingerprint.
    identity = data.name if data.name.startswith("builtin:") else getattr(train, "_fingerprint", data.name)
    text = json.dumps([identity, len(train), resolution, channels, data.id2label, CLASSIFIER_VERSION], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_classifier(
    data: LabeledImages, resolution: int, channels: int, seed: int = 0, min_steps: int = 500, max_epochs: int = 60
):
    """Train a `SampleClassifier` on the train split; return it with its accuracy on the test split (or None)."""
    images, labels = split_as_tensors(data, "train", resolution, channels)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SampleClassifier(channels, data.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    batch_size = 128
    steps_per_epoch = max(1, len(images) // batch_size)
    epochs = min(max_epochs, max(2, -(-min_steps // steps_per_epoch)))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=epochs * steps_per_epoch)

    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            batch = images[index]
            # Shift each batch by up to 1/14 of the image (2 pixels at 28x28), so that slightly off-center samples
            # are still recognised.
            max_shift = round(resolution / 14)
            shift = torch.randint(-max_shift, max_shift + 1, (2,), generator=generator).tolist()
            batch = torch.roll(batch, shifts=shift, dims=(2, 3))
            loss = nn.functional.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()

    test_accuracy = None
    if "test" in data.splits:
        test_images, test_labels = split_as_tensors(data, "test", resolution, channels)
        test_accuracy = float((model.predict(test_images) == test_labels).float().mean())
    return model, test_accuracy


def load_or_train_classifier(data: LabeledImages, resolution: int, channels: int, directory: str | None = None):
    """Return `(classifier, info)` from the cache, training and caching the classifier first when missing.

    `info` contains the test-split accuracy (the ceiling for generated samples), the dataset name and the cache path.
    """
    directory = directory or cache_dir()
    key = _cache_key(data, resolution, channels)
    weights_path = os.path.join(directory, f"classifier-{key}.safetensors")
    info_path = os.path.join(directory, f"classifier-{key}.json")
    model = SampleClassifier(channels, data.num_classes)

    if os.path.isfile(weights_path) and os.path.isfile(info_path):
        try:
            model.load_state_dict(load_file(weights_path))
            with open(info_path, encoding="utf-8") as handle:
                info = json.load(handle)
            model.eval()
            return model, info
        except (OSError, ValueError, RuntimeError) as error:
            logger.warning("Cached classifier %s is unreadable (%s); training a new one", weights_path, error)

    logger.info("Training the evaluation classifier on %s (%d images)", data.name, len(data.splits["train"]))
    model, test_accuracy = train_classifier(data, resolution, channels)
    info = {
        "dataset": data.name,
        "resolution": resolution,
        "channels": channels,
        "num_classes": data.num_classes,
        "test_accuracy": test_accuracy,
        "test_size": len(data.splits["test"]) if "test" in data.splits else 0,
        "version": CLASSIFIER_VERSION,
        "path": weights_path,
    }
    # Write to temporary names, then rename: a killed process never leaves a half-written classifier in the cache.
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as handle:
        json.dump(info, handle, indent=2)
    weights_tmp = weights_path + f".{os.getpid()}.tmp"
    save_file(model.state_dict(), weights_tmp)
    os.replace(weights_tmp, weights_path)
    os.replace(handle.name, info_path)
    model.eval()
    return model, info
