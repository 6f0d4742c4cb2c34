"""Per-element label dropout: its rate, its independence across a batch, the null id it writes, and its inputs."""

import math

import pytest
import torch

from diffusers_cfg.training import train_cfg
from diffusers_cfg.training.model import build_noise_scheduler, build_unet, drop_labels

NUM_CLASSES = 10
NULL_ID = NUM_CLASSES


def digit_labels(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (count,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("drop_prob", [0.1, 0.5, 0.9])
def test_drop_rate_within_binomial_bounds(drop_prob):
    draws = 100_000
    dropped = drop_labels(digit_labels(draws), drop_prob, NULL_ID, torch.Generator().manual_seed(1)) == NULL_ID
    # Five standard deviations of a binomial count: a false failure has odds below one in a million.
    tolerance = 5 * math.sqrt(draws * drop_prob * (1 - drop_prob))
    assert abs(dropped.sum().item() - draws * drop_prob) < tolerance


def test_drops_are_independent_within_a_batch():
    # Per-batch dropout would have the right mean but a variance batch_size times too large.
    batch_size, batches, drop_prob = 64, 2000, 0.1
    generator = torch.Generator().manual_seed(2)
    counts = torch.tensor([
        (drop_labels(digit_labels(batch_size, seed), drop_prob, NULL_ID, generator) == NULL_ID).sum().item()
        for seed in range(batches)
    ], dtype=torch.float64)  # fmt: skip
    expected_variance = batch_size * drop_prob * (1 - drop_prob)
    assert counts.mean().item() == pytest.approx(batch_size * drop_prob, rel=0.05)
    assert 0.85 < counts.var().item() / expected_variance < 1.15


def test_drop_writes_null_id_and_keeps_the_rest():
    labels = digit_labels(1000)
    dropped = drop_labels(labels, 0.3, NULL_ID, torch.Generator().manual_seed(3))
    is_null = dropped == NULL_ID
    assert 0 < is_null.sum() < len(labels)
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert set(dropped.unique().tolist()) <= set(range(NUM_CLASSES)) | {NULL_ID}
    assert dropped.dtype == torch.int64


def test_drop_leaves_input_unchanged():
    labels = digit_labels(500)
    original = labels.clone()
    dropped = drop_labels(labels, 0.5, NULL_ID, torch.Generator().manual_seed(4))
    assert torch.equal(labels, original)
    dropped.fill_(NULL_ID)
    assert torch.equal(labels, original), "the result shares memory with the input"


def test_drop_extremes_and_invalid_rates():
    labels = digit_labels(100)
    assert torch.equal(drop_labels(labels, 0.0, NULL_ID), labels)
    assert torch.equal(drop_labels(labels, 1.0, NULL_ID), torch.full_like(labels, NULL_ID))
    for invalid in (-0.1, 1.5):
        with pytest.raises(ValueError, match=f"cond_drop_prob must be in \\[0, 1\\], got {invalid}"):
            drop_labels(labels, invalid, NULL_ID)


def test_drop_follows_its_generator():
    labels = digit_labels(200)
    first = drop_labels(labels, 0.5, NULL_ID, torch.Generator().manual_seed(5))
    again = drop_labels(labels, 0.5, NULL_ID, torch.Generator().manual_seed(5))
    other = drop_labels(labels, 0.5, NULL_ID, torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_train_step_draws_only_from_its_generator():
    torch.manual_seed(0)
    unet = build_unet(8, 1, NUM_CLASSES, (8, 16))
    scheduler = build_noise_scheduler()
    labels = digit_labels(32)
    batch = {"pixel_values": torch.rand(32, 1, 8, 8) * 2 - 1, "class_labels": labels.clone()}

    def step(seed):
        torch.manual_seed(1000 + seed)  # a different global state each time
        return train_cfg.train_step(batch, unet, scheduler, NULL_ID, 0.5, "epsilon", torch.Generator().manual_seed(7))

    (loss, share), (loss_again, share_again) = step(0), step(1)
    assert torch.equal(loss, loss_again)
    assert torch.equal(share, share_again)
    assert 0.0 < share.item() < 1.0
    assert torch.equal(batch["class_labels"], labels), "train_step changed the batch's labels"
