"""Train for real on builtin:digits, then check what a user checks: the guided samples are of the requested class."""

import json

import pytest
import torch

from diffusers_cfg.pipelines import ClassConditionalPipeline
from diffusers_cfg.training import train_cfg
from diffusers_cfg.training.classifier import load_or_train_classifier
from diffusers_cfg.training.data import load_labeled_images
from diffusers_cfg.training.evaluation import sample_class_balanced, score_samples

CHANCE = 0.1  # ten digit classes


@pytest.mark.slow
def test_digits_training_gives_requested_classes(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSERS_CFG_CACHE", str(tmp_path / "cache"))
    output_dir = tmp_path / "cfg-digits"
    train_cfg.main([
        "--dataset_name", "builtin:digits",
        "--output_dir", str(output_dir),
        "--max_train_steps", "600",
        "--train_batch_size", "64",
        "--lr_warmup_steps", "30",
        "--checkpointing_steps", "300",
        "--sample_every_steps", "0",
        "--eval_samples_per_class", "20",
        "--eval_guidance_scales", "1", "4",
        "--num_inference_steps", "25",
        "--report_to", "none",
    ])  # fmt: skip

    for name in ("model_index.json", "pipeline_class_conditional.py", "README.md", "samples.png", "eval_results.json"):
        assert (output_dir / name).is_file(), f"{name} missing from the output folder"
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    report = json.loads((output_dir / "eval_results.json").read_text())
    accuracy = {row["guidance_scale"]: row["class_accuracy"] for row in report["guidance"]}
    assert report["classifier"]["test_accuracy"] > 0.9, report["classifier"]
    assert accuracy[4.0] > 5 * CHANCE, accuracy
    assert accuracy[4.0] >= accuracy[1.0] - 0.05, accuracy

    # The saved pipeline, reloaded by a user, gives the same kind of samples by class name.
    pipe = ClassConditionalPipeline.from_pretrained(output_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.id2label[7] == "7"
    images = pipe(class_labels=["7"] * 4, guidance_scale=4.0, num_inference_steps=25,
                  generator=torch.Generator().manual_seed(1), output_type="np").images  # fmt: skip
    assert images.shape == (4, 8, 8, 1)

    data = load_labeled_images("builtin:digits")
    classifier, _ = load_or_train_classifier(data, 8, 1)
    samples, labels = sample_class_balanced(pipe, 10, 4.0, num_inference_steps=25, seed=123)
    scores = score_samples(classifier, samples, labels, pipe.num_classes)
    assert scores["accuracy"] > 5 * CHANCE, scores
