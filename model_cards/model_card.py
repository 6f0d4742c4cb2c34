"""Fill the model card (the README.md of a saved pipeline) from what training knows.

`render_model_card(**info)` returns the card as text and `write_model_card(output_dir, **info)` writes it to
`output_dir/README.md`. Every field is optional; a section whose data is missing is left out, and no field is ever
rendered as "None". `training_card_fields(report)` returns the fields of a training run from its `eval_results.json`,
so that the training script and the guidance sweep render the same card.

Fields:
    repo_id (str): the Hub id, used in the loading examples and as the default title. Without it the examples show
        a placeholder and say to replace it.
    model_name (str): the card's title.
    description (str): a paragraph under the title.
    id2label (dict): class id (int, or str as JSON stores it) to class name.
    num_classes (int): the number of classes, without the null label; defaults to `len(id2label)`.
    dataset_name (str): the training data as given to `--dataset_name`: a Hub id, a local folder or file, or
        `builtin:<name>`. Only a Hub id goes into the `datasets` metadata.
    dataset_description (str): a sentence about the data.
    license (str): a Hub licence id; "apache-2.0" (the licence of diffusers-cfg) by default.
    resolution (int), num_channels (int): the image size and channel count.
    guidance_scale (float): the recommended guidance scale s, used in the examples.
    guidance_scale_source (str): how the recommended scale was chosen, shown under it.
    num_inference_steps (int): the recommended number of sampling steps, used in the examples.
    sample_grid (str): the path of a sample image relative to the card, for example "samples/grid.png".
    sample_grid_caption (str): the caption of that image.
    evaluation (dict): see `EVALUATION_FIELDS`.
    training_settings (dict): setting name to value, shown as a table in the given order; None values are dropped.
    versions (dict): library to version. Without it, the installed versions of Python, diffusers-cfg, diffusers,
        torch, huggingface_hub, accelerate and datasets are shown; pass `{}` to leave the section out.
    tags (list of str): tags added to the standard ones.
    pipeline_tag (str): a Hub task id. Left out by default, because none of the Hub's tasks is class-conditional
        generation: "unconditional-image-generation" would file the model among generators that take no input.
"""

import importlib.metadata
import json
import logging
import math
import os
import platform
import re
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import ModelCardData

logger = logging.getLogger(__name__)

TEMPLATE_NAME = "model_card.md.jinja"
CARD_FILENAME = "README.md"
DEFAULT_LICENSE = "apache-2.0"
STANDARD_TAGS = ("diffusers", "class-conditional", "classifier-free-guidance", "image-generation")

CARD_FIELDS = frozenset({
    "repo_id", "model_name", "description", "id2label", "num_classes", "dataset_name", "dataset_description",
    "license", "resolution", "num_channels", "guidance_scale", "guidance_scale_source", "num_inference_steps",
    "sample_grid", "sample_grid_caption", "evaluation", "training_settings", "versions", "tags", "pipeline_tag",
})  # fmt: skip

# Keys of the `evaluation` field:
#   results: a list of dicts, one per guidance scale, each with "guidance_scale" and any of the metric keys below;
#   protocol: how the metrics were measured, replacing the standard description;
#   classifier_accuracy: the classifier's accuracy on the real test split, the ceiling of class accuracy;
#   num_samples: generated images per guidance scale; num_inference_steps and scheduler: how they were sampled;
#   notes: a closing paragraph.
EVALUATION_FIELDS = frozenset({
    "results", "protocol", "classifier_accuracy", "num_samples", "num_inference_steps", "scheduler", "notes",
})  # fmt: skip

# Metric key in a result row, column title, and format: "share" values are fractions in [0, 1] shown as percentages.
RESULT_COLUMNS = (
    ("class_accuracy", "class accuracy", "share"),
    ("classifier_fid", "classifier FID", "distance"),
    ("precision", "precision", "share"),
    ("recall", "recall", "share"),
)

DEFAULT_PROTOCOL = (
    "a small CNN classifier, trained on the training split of the same data, labels the generated images. Class "
    "accuracy is the share of images that it assigns to the requested class, over a class-balanced batch at each "
    "guidance scale."
)

# Guidance scales always shown in the s/w table; the recommended scale is added when it is not among them.
REFERENCE_SCALES = (0.0, 1.0, 2.0, 4.0)

# More classes than this are folded into a <details> block.
MAX_UNFOLDED_CLASSES = 20

# Written by the training script next to the pipeline: the resolved training configuration under "training" and,
# when the run scored its samples, "classifier" and "guidance".
TRAINING_REPORT_FILENAME = "eval_results.json"
TRAINING_SCALE_SOURCE = "set by --guidance_scale at training time"

MODEL_ID_PLACEHOLDER = "<user>/<model>"
HUB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def render_model_card(**info: Any) -> str:
    """Render the model card from the fields described in this module's docstring."""
    context = build_context(info)
    return _environment().get_template(TEMPLATE_NAME).render(**context)


def write_model_card(output_dir: str | os.PathLike, **info: Any) -> Path:
    """Render the model card and write it to `output_dir/README.md`; return that path.

    A `sample_grid` that does not exist under `output_dir` is logged as a warning, because the Hub page would show a
    broken image.
    """
    output_dir = Path(output_dir)
    card = render_model_card(**info)
    sample_grid = info.get("sample_grid")
    if sample_grid and not (output_dir / sample_grid).is_file():
        logger.warning("The model card shows %s, but %s does not exist.", sample_grid, output_dir / sample_grid)
    output_dir.mkdir(parents=True, exist_ok=True)
    card_path = output_dir / CARD_FILENAME
    card_path.write_text(card, encoding="utf-8")
    logger.info("Wrote the model card to %s", card_path)
    return card_path


def training_card_fields(report: dict[str, Any]) -> dict[str, Any]:
    """Return the card fields of a training run from its report, the content of `eval_results.json`.

    The recommended scale is the run's --guidance_scale, which training also saves as the pipeline's default. A
    caller that changes that default overrides `guidance_scale` and `guidance_scale_source` in the result.
    """
    config = report["training"]
    evaluation = None
    if "guidance" in report:
        evaluation = {
            "results": [
                {"guidance_scale": row["guidance_scale"], "class_accuracy": row["class_accuracy"]}
                for row in report["guidance"]
            ],
            "classifier_accuracy": report["classifier"]["test_accuracy"],
            "num_samples": report["guidance"][0]["num_samples"],
            "num_inference_steps": config["num_inference_steps"],
            "scheduler": report["guidance"][0]["scheduler"],
        }
    resolution, channels = config["resolution"], config["channels"]
    ema = "off" if config["no_ema"] else f"max decay {config['ema_max_decay']}, warm-up power {config['ema_power']}"
    settings = {
        "dataset": report["dataset"],
        "resolution": f"{resolution}x{resolution}, {channels} channel(s)",
        "UNet block channels": config["block_out_channels"],
        "parameters": f"{config['num_parameters'] / 1e6:.2f}M",
        "label dropout (cond_drop_prob)": config["cond_drop_prob"],
        "optimizer steps": config["max_train_steps"],
        "batch size": config["total_batch_size"],
        "learning rate": (
            f"{config['learning_rate']:g} ({config['lr_scheduler']}, {config['lr_warmup_steps']} warm-up steps)"
        ),
        "EMA": ema,
        "mixed precision": config["mixed_precision_resolved"],
        "noise schedule": (
            f"{config['beta_schedule']}, {config['num_train_timesteps']} steps, {config['prediction_type']} prediction"
        ),
    }
    return {
        "repo_id": config["hub_model_id"],
        "id2label": config["id2label"],
        "num_classes": config["num_classes"],
        "dataset_name": report["dataset"],
        "resolution": resolution,
        "num_channels": channels,
        "guidance_scale": config["guidance_scale"],
        "guidance_scale_source": TRAINING_SCALE_SOURCE,
        "num_inference_steps": config["num_inference_steps"],
        "sample_grid": "samples.png",
        "sample_grid_caption": f"One row per class, eight seeds, guidance scale s = {config['guidance_scale']:g}.",
        "evaluation": evaluation,
        "training_settings": settings,
    }


def installed_versions() -> dict[str, str]:
    """Return the versions of Python and of the libraries that the pipeline and its training use."""
    versions = {"python": platform.python_version()}
    for distribution in ("diffusers-cfg", "diffusers", "torch", "huggingface_hub", "accelerate", "datasets"):
        try:
            versions[distribution] = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


# Template context


def build_context(info: dict[str, Any]) -> dict[str, Any]:
    """Validate the fields and derive every variable that the template reads."""
    unknown = sorted(set(info) - CARD_FIELDS)
    if unknown:
        raise TypeError(f"Unknown model card fields {unknown}; known fields: {sorted(CARD_FIELDS)}")
    info = {key: value for key, value in info.items() if value is not None}

    classes = _classes(info.get("id2label"), info.get("num_classes"))
    num_classes = info.get("num_classes", len(classes) or None)
    repo_id = info.get("repo_id")
    dataset_name = info.get("dataset_name")
    guidance_scale = _optional_float(info, "guidance_scale")

    context = {
        "card_data": _card_data(info, dataset_name).to_yaml(),
        "title": info.get("model_name") or (repo_id.split("/")[-1] if repo_id else "Class-conditional diffusion model"),
        "description": info.get("description"),
        "model_id": repo_id or MODEL_ID_PLACEHOLDER,
        "model_id_is_placeholder": repo_id is None,
        "num_classes": num_classes,
        "null_class_id": num_classes,
        "classes": classes,
        "collapse_classes": len(classes) > MAX_UNFOLDED_CLASSES,
        "example_labels": _example_labels(classes, num_classes),
        "image_description": _image_description(info.get("resolution"), info.get("num_channels")),
        "dataset_name": dataset_name,
        "dataset_reference": _dataset_reference(dataset_name) if dataset_name else None,
        "dataset_description": info.get("dataset_description"),
        "sample_grid": _relative_path(info.get("sample_grid")),
        "sample_grid_caption": info.get("sample_grid_caption") or "Samples generated by this model.",
        "guidance_scale": guidance_scale,
        "guidance_scale_source": info.get("guidance_scale_source"),
        "guidance_rows": _guidance_rows(guidance_scale),
        "num_inference_steps": info.get("num_inference_steps"),
        "evaluation": _evaluation(info.get("evaluation")),
        "training_settings": [
            (name, format_value(value)) for name, value in (info.get("training_settings") or {}).items()
            if value is not None
        ],
        "versions": list((installed_versions() if "versions" not in info else info["versions"]).items()),
    }  # fmt: skip
    return context


def _card_data(info: dict[str, Any], dataset_name: str | None) -> ModelCardData:
    tags = list(STANDARD_TAGS)
    tags += [tag for tag in info.get("tags", []) if tag not in tags]
    hub_dataset = dataset_name if dataset_name and is_hub_dataset_id(dataset_name) else None
    return ModelCardData(
        library_name="diffusers",
        license=info.get("license", DEFAULT_LICENSE),
        tags=tags,
        datasets=[hub_dataset] if hub_dataset else None,
        pipeline_tag=info.get("pipeline_tag"),
    )


def is_hub_dataset_id(name: str) -> bool:
    """Return whether `name` is a Hub dataset id ("namespace/name") rather than a local path or a built-in name."""
    return HUB_ID_PATTERN.fullmatch(name) is not None and not os.path.exists(name)


def _classes(id2label: dict | None, num_classes: int | None) -> list[tuple[int, str]]:
    if not id2label:
        return []
    try:
        classes = sorted((int(key), str(name)) for key, name in id2label.items())
    except (TypeError, ValueError):
        raise ValueError(f"id2label keys must be class ids (ints or digit strings), got {sorted(id2label)}")
    expected_count = num_classes if num_classes is not None else len(classes)
    ids = [class_id for class_id, _ in classes]
    if ids != list(range(expected_count)):
        raise ValueError(
            f"id2label must name each class id 0 to {expected_count - 1} once, got ids {ids}; "
            "num_classes does not count the null label"
        )
    return classes


def _example_labels(classes: list[tuple[int, str]], num_classes: int | None) -> list:
    """Pick two labels for the usage examples: class names when known, ids otherwise."""
    if classes:
        return [name for _, name in classes[:2]]
    return list(range(min(num_classes or 1, 2)))


def _image_description(resolution: int | None, num_channels: int | None) -> str:
    color = {1: "grayscale ", 3: "RGB "}.get(num_channels, f"{num_channels}-channel " if num_channels else "")
    size = f"{resolution}x{resolution} " if resolution else ""
    return f"{size}{color}images"


def _dataset_reference(dataset_name: str) -> str:
    if dataset_name.startswith("builtin:"):
        return f"`{dataset_name}`, a data set built into diffusers-cfg"
    if is_hub_dataset_id(dataset_name):
        return f"[{dataset_name}](https://huggingface.co/datasets/{dataset_name})"
    # A local path means nothing to readers of the Hub page and may expose a home folder, so show its last part.
    return f"a local data set (`{Path(dataset_name).name or dataset_name}`)"


def _relative_path(path: str | None) -> str | None:
    if path is None:
        return None
    if Path(path).is_absolute():
        raise ValueError(f"sample_grid must be relative to the model card's folder, got the absolute path {path}")
    return Path(path).as_posix()


def _optional_float(info: dict[str, Any], key: str) -> float | None:
    if key not in info:
        return None
    value = float(info[key])
    if not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {info[key]!r}")
    return value


def _guidance_rows(recommended: float | None) -> list[dict[str, Any]]:
    scales = sorted(set(REFERENCE_SCALES) | ({recommended} if recommended is not None else set()))
    rows = []
    for scale in scales:
        if scale == 0:
            effect = "unconditional: the label is ignored"
        elif scale < 1:
            effect = "between unconditional and conditional"
        elif scale == 1:
            effect = "conditional, without guidance"
        else:
            effect = "guided: more typical of the class, less varied"
        if scale == recommended:
            effect += " (recommended)"
        rows.append({"s": scale, "w": scale - 1, "effect": effect})
    return rows


def _evaluation(evaluation: dict | None) -> dict[str, Any] | None:
    if not evaluation:
        return None
    unknown = sorted(set(evaluation) - EVALUATION_FIELDS)
    if unknown:
        raise TypeError(f"Unknown evaluation fields {unknown}; known fields: {sorted(EVALUATION_FIELDS)}")

    results = sorted(evaluation.get("results") or [], key=lambda row: float(row["guidance_scale"]))
    columns = [column for column in RESULT_COLUMNS if any(row.get(column[0]) is not None for row in results)]
    header = ["s", "w"] + [title for _, title, _ in columns]
    rows = []
    for result in results:
        scale = float(result["guidance_scale"])
        cells = [format_number(scale), format_number(scale - 1)]
        cells += [format_metric(result.get(key), kind, key) for key, _, kind in columns]
        rows.append(cells)

    details = []
    if evaluation.get("classifier_accuracy") is not None:
        accuracy = format_metric(evaluation["classifier_accuracy"], "share", "classifier_accuracy")
        details.append(f"Classifier accuracy on the real test split: {accuracy} (the ceiling for class accuracy).")
    if evaluation.get("num_samples") is not None:
        details.append(f"Generated images per guidance scale: {evaluation['num_samples']}.")
    sampling = [
        f"{evaluation['num_inference_steps']} steps" if evaluation.get("num_inference_steps") else None,
        f"scheduler {evaluation['scheduler']}" if evaluation.get("scheduler") else None,
    ]
    if any(sampling):
        details.append("Sampling: " + ", ".join(part for part in sampling if part) + ".")

    return {
        "header": header,
        "separator": "|" + "---:|" * len(header),
        "rows": rows,
        "protocol": evaluation.get("protocol") or DEFAULT_PROTOCOL,
        "details": details,
        "has_fid": any(key == "classifier_fid" for key, _, _ in columns),
        "notes": evaluation.get("notes"),
    }


# Formatting


def format_number(value: float) -> str:
    """Format a number compactly: 4.0 as "4", 7.5 as "7.5", 0.1234567 as "0.123457"."""
    return f"{float(value):g}"


def format_metric(value: Any, kind: str, name: str) -> str:
    if value is None:
        return "–"
    value = float(value)
    if kind == "share":
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be a fraction in [0, 1], got {value}")
        return f"{100 * value:.1f}%"
    return f"{value:.2f}"


def format_value(value: Any) -> str:
    """Format a training setting for a table cell."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format_number(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _markdown_cell(text: Any) -> str:
    """Escape text for a Markdown table cell: a pipe would end the cell and a line break the row."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _python_literal(value: str | list) -> str:
    """Write a string or a list of strings and ints as Python source, with double quotes as formatters write it."""
    return json.dumps(value, ensure_ascii=False)


def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    environment.filters["python_literal"] = _python_literal
    environment.filters["number"] = format_number
    environment.filters["md_cell"] = _markdown_cell
    return environment
