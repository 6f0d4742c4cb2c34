"""The model card: metadata, class table, guidance convention, optional sections."""

import importlib.metadata
import json
import logging
import re

import pytest
import yaml
from diffusers_cfg.model_cards.model_card import (
    STANDARD_TAGS,
    render_model_card,
    training_card_fields,
    write_model_card,
)
from huggingface_hub import ModelCard

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def full_info(**overrides):
    """Every field the training script can fill, with JSON-style string keys in id2label."""
    info = {
        "repo_id": "test-user/cfg-digits",
        "model_name": "CFG digits",
        "description": "A small model trained on CPU.",
        "id2label": {str(index): name for index, name in enumerate(DIGIT_NAMES)},
        "num_classes": 10,
        "dataset_name": "builtin:digits",
        "dataset_description": "1,797 handwritten digits, 8x8 pixels.",
        "license": "mit",
        "resolution": 8,
        "num_channels": 1,
        "guidance_scale": 3.0,
        "guidance_scale_source": "The guidance sweep scored it highest on class accuracy.",
        "num_inference_steps": 25,
        "sample_grid": "samples/grid.png",
        "sample_grid_caption": "One row per class.",
        "evaluation": {
            "results": [
                {"guidance_scale": 4.0, "class_accuracy": 0.97, "classifier_fid": 3.25},
                {"guidance_scale": 1.0, "class_accuracy": 0.71, "classifier_fid": 5.5},
            ],
            "classifier_accuracy": 0.985,
            "num_samples": 500,
            "num_inference_steps": 25,
            "scheduler": "DDIMScheduler",
            "notes": "Scores come from one seed.",
        },
        "training_settings": {"learning_rate": 0.002, "train_batch_size": 64, "use_ema": True, "seed": None},
        "versions": {"diffusers": "0.42.1", "torch": "2.13.0"},
        "tags": ["mnist-like"],
    }
    info.update(overrides)
    return info


def front_matter(card: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "the card does not start with a --- metadata block"
    return yaml.safe_load(match.group(1))


def section(card: str, title: str) -> str:
    """Return the text of a `## title` section, up to the next section."""
    start = card.index(f"## {title}\n")
    end = card.find("\n## ", start + 1)
    return card[start : end if end != -1 else len(card)]


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.DOTALL)


def test_metadata_parses_with_expected_keys():
    card = render_model_card(**full_info(dataset_name="user/digits-on-hub"))

    metadata = front_matter(card)
    assert metadata["library_name"] == "diffusers"
    assert metadata["license"] == "mit"
    assert set(STANDARD_TAGS) <= set(metadata["tags"])
    assert {"diffusers", "class-conditional", "classifier-free-guidance", "image-generation"} <= set(metadata["tags"])
    assert "mnist-like" in metadata["tags"]
    assert metadata["datasets"] == ["user/digits-on-hub"]
    assert "pipeline_tag" not in metadata
    assert ModelCard(card).data.library_name == "diffusers"


def test_metadata_lists_only_hub_datasets():
    for dataset_name in ("builtin:digits", "/data/my-digits", "./digits"):
        metadata = front_matter(render_model_card(**full_info(dataset_name=dataset_name)))
        assert "datasets" not in metadata, dataset_name
    assert front_matter(render_model_card())["license"] == "apache-2.0"
    assert front_matter(render_model_card(pipeline_tag="image-to-image"))["pipeline_tag"] == "image-to-image"


def test_local_dataset_path_shows_name_only():
    card = render_model_card(**full_info(dataset_name="/home/alice/data/my-digits"))

    assert "my-digits" in card
    assert "/home/alice" not in card


def test_class_table_names_and_null_id():
    card = render_model_card(**full_info())
    classes = section(card, "Classes")

    rows = re.findall(r"^\| (\d+) \| (.+) \|$", classes, re.MULTILINE)
    assert rows[:10] == [(str(index), name) for index, name in enumerate(DIGIT_NAMES)]
    assert rows[10] == ("10", "*null label*")
    assert "Id 10 (the number of classes) is the null label" in classes


def test_usage_examples_use_class_names():
    card = render_model_card(**full_info())
    blocks = python_blocks(card)

    assert len(blocks) == 2
    assert "from diffusers_cfg.pipelines import ClassConditionalPipeline" in blocks[0]
    assert 'ClassConditionalPipeline.from_pretrained("test-user/cfg-digits")' in blocks[0]
    assert 'DiffusionPipeline.from_pretrained("test-user/cfg-digits", trust_remote_code=True)' in blocks[1]
    for block in blocks:
        assert 'class_labels=["zero", "one"]' in block
        assert "guidance_scale=3" in block
        compile(block, "<model card example>", "exec")


def test_guidance_section_shows_s_and_w():
    card = render_model_card(**full_info(guidance_scale=7.5))
    guidance = section(card, "Classifier-free guidance")

    assert "eps = eps_null + s * (eps_label - eps_null)" in guidance
    assert "w = s - 1" in guidance
    rows = re.findall(r"^\| (-?[\d.]+) \| (-?[\d.]+) \| (.+) \|$", guidance, re.MULTILINE)
    assert [float(s) for s, _, _ in rows] == [0, 1, 2, 4, 7.5]
    for s, w, _ in rows:
        assert float(w) == float(s) - 1
    assert rows[-1][2].endswith("(recommended)")
    assert "**Recommended guidance scale: s = 7.5 (w = 6.5).**" in guidance
    assert "The guidance sweep scored it highest" in guidance


def test_evaluation_table_and_fid_caveat():
    card = render_model_card(**full_info())
    evaluation = section(card, "Evaluation")

    assert "| s | w | class accuracy | classifier FID |" in evaluation
    rows = re.findall(r"^\| ([\d.]+) \| (-?[\d.]+) \| ([\d.]+%) \| ([\d.]+) \|$", evaluation, re.MULTILINE)
    assert rows == [("1", "0", "71.0%", "5.50"), ("4", "3", "97.0%", "3.25")]
    assert "not comparable with the Inception FID" in evaluation
    assert "98.5%" in evaluation
    assert "500" in evaluation
    assert "Scores come from one seed." in evaluation

    without_fid = render_model_card(evaluation={"results": [{"guidance_scale": 2, "class_accuracy": 0.5}]})
    assert "classifier FID" not in without_fid
    assert "Inception" not in without_fid


def test_none_is_never_rendered():
    cards = [
        render_model_card(),
        render_model_card(**{key: None for key in full_info()}),
        render_model_card(**full_info()),
        render_model_card(
            **full_info(evaluation={"results": [{"guidance_scale": 1, "class_accuracy": 0.5, "classifier_fid": None}]})
        ),
    ]

    for card in cards:
        assert "None" not in card
        assert "\n\n\n" not in card


def test_optional_sections_drop_out():
    full = render_model_card(**full_info())
    minimal = render_model_card(versions={})

    for heading in ("## Classes", "## Evaluation", "## Training", "## Software"):
        assert heading in full
        assert heading not in minimal
    assert "![One row per class.](samples/grid.png)" in full
    assert "![" not in minimal
    assert "Recommended guidance scale" not in minimal
    assert "guidance_scale=" not in "".join(python_blocks(minimal))
    assert "<user>/<model>" in minimal
    assert "<user>/<model>" not in full


def test_training_settings_and_versions():
    card = render_model_card(**full_info())

    assert "| `learning_rate` | 0.002 |" in section(card, "Training")
    assert "| `use_ema` | true |" in section(card, "Training")
    assert "`seed`" not in card
    assert "| diffusers | 0.42.1 |" in section(card, "Software")

    installed = section(render_model_card(), "Software")
    assert f"| diffusers | {importlib.metadata.version('diffusers')} |" in installed


def test_class_names_are_escaped_in_table():
    card = render_model_card(id2label={0: "cat | dog", 1: "new\nline"}, versions={})

    assert r"| 0 | cat \| dog |" in card
    assert "| 1 | new line |" in card
    compile(python_blocks(card)[0], "<model card example>", "exec")


def test_invalid_fields_raise():
    with pytest.raises(TypeError, match="guidance"):
        render_model_card(guidance=4.0)
    with pytest.raises(TypeError, match="accuracy"):
        render_model_card(evaluation={"accuracy": 0.9})
    with pytest.raises(ValueError, match="id2label"):
        render_model_card(id2label={0: "a", 2: "c"})
    with pytest.raises(ValueError, match="id2label"):
        render_model_card(id2label={0: "a", 1: "b"}, num_classes=3)
    with pytest.raises(ValueError, match="class_accuracy"):
        render_model_card(evaluation={"results": [{"guidance_scale": 1, "class_accuracy": 97.0}]})
    with pytest.raises(ValueError, match="relative"):
        render_model_card(sample_grid="/tmp/grid.png")


def test_write_model_card_to_folder(tmp_path, caplog):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "grid.png").write_bytes(b"png")

    path = write_model_card(tmp_path, **full_info())

    assert path == tmp_path / "README.md"
    assert path.read_text(encoding="utf-8") == render_model_card(**full_info())
    with caplog.at_level(logging.WARNING):
        write_model_card(tmp_path / "other", **full_info())
    assert "samples/grid.png" in caplog.text


def training_report(**guidance) -> dict:
    """A report as the training script writes eval_results.json, read back from JSON (string id2label keys)."""
    config = {
        "hub_model_id": "test-user/cfg-digits", "id2label": dict(enumerate(DIGIT_NAMES)), "num_classes": 10,
        "resolution": 8, "channels": 1, "guidance_scale": 4.0, "num_inference_steps": 25,
        "block_out_channels": [8, 16], "num_parameters": 41234, "cond_drop_prob": 0.1, "max_train_steps": 600,
        "total_batch_size": 64, "learning_rate": 0.002, "lr_scheduler": "cosine", "lr_warmup_steps": 30,
        "no_ema": False, "ema_max_decay": 0.9999, "ema_power": 0.75, "mixed_precision_resolved": "no",
        "beta_schedule": "linear", "num_train_timesteps": 1000, "prediction_type": "v_prediction",
    }  # fmt: skip
    report = {"dataset": "builtin:digits", "num_classes": 10, "training": config, **guidance}
    return json.loads(json.dumps(report))


def test_training_card_from_report():
    rows = [
        {"guidance_scale": 1.0, "guidance_weight": 0.0, "class_accuracy": 0.74, "num_samples": 200,
         "scheduler": "DDIMScheduler"},
        {"guidance_scale": 4.0, "guidance_weight": 3.0, "class_accuracy": 0.98, "num_samples": 200,
         "scheduler": "DDIMScheduler"},
    ]  # fmt: skip
    card = render_model_card(**training_card_fields(training_report(classifier={"test_accuracy": 0.95}, guidance=rows)),
                             versions={})  # fmt: skip

    assert "**Recommended guidance scale: s = 4 (w = 3).**\nset by --guidance_scale at training time" in card
    assert 'ClassConditionalPipeline.from_pretrained("test-user/cfg-digits")' in card
    assert "| 9 | nine |" in section(card, "Classes")
    evaluation = section(card, "Evaluation")
    assert "| 1 | 0 | 74.0% |" in evaluation
    assert "| 4 | 3 | 98.0% |" in evaluation
    assert "Classifier accuracy on the real test split: 95.0%" in evaluation
    assert "Sampling: 25 steps, scheduler DDIMScheduler." in evaluation
    training = section(card, "Training")
    assert "| `batch size` | 64 |" in training
    assert "| `learning rate` | 0.002 (cosine, 30 warm-up steps) |" in training
    assert "| `noise schedule` | linear, 1000 steps, v_prediction prediction |" in training
    assert "| `parameters` | 0.04M |" in training


def test_training_card_without_evaluation():
    fields = training_card_fields(training_report())

    assert fields["evaluation"] is None
    assert "## Evaluation" not in render_model_card(**fields, versions={})
