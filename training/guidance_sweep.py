"""Sweep the guidance scale of a saved pipeline and score the samples of every setting with the dataset's classifier.

    diffusers-cfg-sweep cfg-mnist
    python -m diffusers_cfg.training.guidance_sweep cfg-mnist --guidance_weights 0 1 3 --schedulers ddim \\
        --num_inference_steps 25 --samples_per_class 50 --set_default fid

For every scheduler, step count, guidance scale and seed, the command draws a class-balanced batch and scores it with
the cached classifier of `diffusers_cfg.training.classifier`: class accuracy overall and per class, classifier FID
against the test split, and precision and recall (k = 3) against the test split. Each metric is then reported as the
mean and standard deviation over the seeds. The output folder receives:

    sweep.csv          one row per setting and seed
    sweep_summary.csv  one row per setting: mean, standard deviation and count of every metric over the seeds
    sweep.md           the summary as markdown tables, with the classifier's ceiling and how to read the numbers
    sweep.png          the four metrics against w, one line per scheduler and step count
    grid_w<w>.png      one sample grid per scale: a row per class, the columns grouped by seed
    sweep.json         the scales with the best classifier FID and the best class accuracy, and the run settings

Guidance follows the diffusers convention: the scale s mixes eps = eps_null + s * (eps_label - eps_null), and the
weight of Ho & Salimans (2022) is w = s - 1. Every table, plot and message shows both.
"""

import argparse
import csv
import inspect
import json
import logging
import math
import os
import stat
import tempfile

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusers_cfg.model_cards.model_card import (
    CARD_FILENAME,
    TRAINING_REPORT_FILENAME,
    training_card_fields,
    write_model_card,
)
from diffusers_cfg.pipelines import ClassConditionalPipeline
from diffusers_cfg.pipelines.command_line import check_output_folder, configure_logging, resolve_device
from diffusers_cfg.pipelines.sample import SCHEDULER_ALIASES, scheduler_class
from diffusers_cfg.training.classifier import load_or_train_classifier
from diffusers_cfg.training.data import load_labeled_images, split_as_tensors
from diffusers_cfg.training.evaluation import guidance_weight, image_grid, sample_class_balanced
from diffusers_cfg.training.evaluation import score_samples as class_accuracy_of_samples
from diffusers_cfg.training.metrics import (
    fit_gaussian,
    gaussian_frechet_distance,
    mean_and_spread,
    precision_recall,
)

logger = logging.getLogger(__name__)

DEFAULT_GUIDANCE_WEIGHTS = (-1.0, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0)
# Neighbour rank of the precision and recall manifolds, as in Kynkäänniemi et al. (2019).
PRECISION_RECALL_K = 3
# Metrics of one run, in table order.
METRICS = ("class_accuracy", "classifier_fid", "precision", "recall")
# Columns that identify a setting. A run adds its seed to them.
SETTING_COLUMNS = ("scheduler", "scheduler_class", "num_inference_steps", "guidance_scale", "guidance_weight")
# Approximate number of columns of a sample grid, shared among the seeds.
GRID_COLUMNS = 8
# Report labels of the two recommended scales, keyed by the --set_default choice that picks each.
RECOMMENDATION_LABELS = {"fid": "best classifier FID", "accuracy": "best class accuracy"}
# Values of the pipeline's clip_sample argument for each --clip_sample choice.
CLIP_SAMPLE_CHOICES = {"auto": None, "on": True, "off": False}
TRAINING_CONFIG = "training_config.json"
PIPELINE_INDEX = "model_index.json"
# Subfolder of PIPELINE_DIR that receives the reports when --output_dir is omitted.
DEFAULT_OUTPUT_FOLDER = "guidance_sweep"


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sample a saved class-conditional pipeline over a range of guidance scales and score every "
        "setting with the dataset's classifier: class accuracy, classifier FID, precision and recall.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("pipeline_dir", help="Local folder of a saved ClassConditionalPipeline (the training output).")
    parser.add_argument("--dataset_name", default=None,
                        help=f"Dataset of the classifier and the real test split. Defaults to the dataset_name in "
                             f"the folder's {TRAINING_CONFIG}.")  # fmt: skip

    guidance = parser.add_mutually_exclusive_group()
    guidance.add_argument("--guidance_weights", type=float, nargs="+", default=list(DEFAULT_GUIDANCE_WEIGHTS),
                          help="Guidance weights w = s - 1 to sweep, each >= -1 (w = -1 is unconditional, w = 0 plain "
                               "conditional).")
    guidance.add_argument("--guidance_scales", type=float, nargs="+", default=None,
                          help="Guidance scales s = w + 1 to sweep instead of weights, each >= 0.")

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument("--schedulers", nargs="+", default=["ddim", "dpm++"],
                          help=f"Schedulers to sample with: {', '.join(SCHEDULER_ALIASES)} or diffusers class names. "
                               "The first one, with the first step count, is the reference setting that picks the "
                               "recommended scales.")
    sampling.add_argument("--num_inference_steps", type=int, nargs="+", default=[50, 25],
                          help="Denoising step counts to sample with.")
    sampling.add_argument("--samples_per_class", type=int, default=100,
                          help="Samples of every class per setting and seed.")
    sampling.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                          help="Seeds, each >= 0. With N samples per seed, image i of seed k starts from the noise "
                               "of generator seed k * N + i, so seeds never share noise, and all settings of one "
                               "seed start from the same noise.")
    sampling.add_argument("--clip_sample", default="auto", choices=["auto", "on", "off"],
                          help="Clip the x_0 estimate to [-1, 1] at every step (the pipeline's clip_sample). 'auto' "
                               "follows each scheduler's config, which for a pipeline saved by training means off.")
    sampling.add_argument("--batch_size", type=int, default=250, help="Images per pipeline call.")
    sampling.add_argument("--mixed_precision", default="no", choices=["no", "bf16", "fp16"],
                          help="Autocast dtype for sampling. 'no' samples in fp32.")
    sampling.add_argument("--device", default=None, help="torch device. Defaults to cuda when available, else cpu.")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default=None, help="Folder for the tables, plot and grids. Defaults to "
                        f"PIPELINE_DIR/{DEFAULT_OUTPUT_FOLDER}.")  # fmt: skip
    output.add_argument("--set_default", default="none", choices=["accuracy", "fid", "none"],
                        help="Write the scale with the best class accuracy or classifier FID of the reference "
                             "setting into the pipeline's model_index.json as default_guidance_scale, and into the "
                             "model card README.md as the recommended scale.")
    return parser.parse_args(argv)


def guidance_scales_from_args(args: argparse.Namespace) -> list:
    """Return the swept scales s, sorted and without repeats, from --guidance_scales or --guidance_weights."""
    if args.guidance_scales is not None:
        for scale in args.guidance_scales:
            if not math.isfinite(scale) or scale < 0:
                raise ValueError(
                    f"--guidance_scales {scale:g} is invalid: a scale must be finite and >= 0 "
                    "(s = 0 is unconditional, s = 1 plain conditional)"
                )
        scales = args.guidance_scales
    else:
        weights = args.guidance_weights
        for weight in weights:
            if not math.isfinite(weight) or weight < -1:
                raise ValueError(
                    f"--guidance_weights {weight:g} is invalid: it gives the scale s = w + 1 = {weight + 1:g}, but a "
                    "weight must be finite and >= -1 (w = -1 is unconditional, w = 0 plain conditional)"
                )
        scales = [weight + 1.0 for weight in weights]
    return sorted({float(scale) for scale in scales})


def check_args(args: argparse.Namespace) -> None:
    """Raise a ValueError that names the flag and the value for settings that cannot run, before any work starts."""
    for steps in args.num_inference_steps:
        if steps < 1:
            raise ValueError(f"--num_inference_steps {steps} is invalid: every step count must be at least 1")
    if args.samples_per_class < 1:
        raise ValueError(f"--samples_per_class {args.samples_per_class} is invalid: it must be at least 1")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size {args.batch_size} is invalid: it must be at least 1")
    for seed in args.seeds:
        if seed < 0:
            raise ValueError(f"--seeds {seed} is invalid: seeds must be >= 0")
    repeated = sorted({seed for seed in args.seeds if args.seeds.count(seed) > 1})
    if repeated:
        # A repeated seed repeats the same samples and would shrink the spread without measuring anything.
        raise ValueError(f"--seeds lists {repeated} more than once. Give distinct seeds")
    for name, values in (("--schedulers", args.schedulers), ("--num_inference_steps", args.num_inference_steps)):
        if len(set(values)) != len(values):
            raise ValueError(f"{name} lists a value more than once: {values}")


def resolve_schedulers(names: list) -> list:
    """Return the diffusers scheduler class of every name in --schedulers."""
    classes = []
    for name in names:
        try:
            classes.append(scheduler_class(name))
        except ValueError as error:
            raise ValueError(
                f"--schedulers {name!r} is not a diffusers scheduler. Use one of {', '.join(SCHEDULER_ALIASES)} "
                "or a class name such as DPMSolverMultistepScheduler"
            ) from error
    return classes


def check_pipeline_dir(pipeline_dir: str) -> None:
    """Raise a ValueError unless the folder contains a saved ClassConditionalPipeline."""
    index_path = os.path.join(pipeline_dir, PIPELINE_INDEX)
    if not os.path.isdir(pipeline_dir):
        raise ValueError(f"PIPELINE_DIR {pipeline_dir!r} is not a folder. Give the output folder of training")
    if not os.path.isfile(index_path):
        raise ValueError(
            f"PIPELINE_DIR {pipeline_dir!r} is not a saved pipeline: it has no {PIPELINE_INDEX}. Give the folder that "
            "training or ClassConditionalPipeline.save_pretrained wrote"
        )
    with open(index_path, encoding="utf-8") as handle:
        try:
            class_name = json.load(handle).get("_class_name")
        except json.JSONDecodeError as error:
            raise ValueError(f"PIPELINE_DIR {pipeline_dir!r} has an invalid {PIPELINE_INDEX}: {error}") from error
    # A folder saved by ClassConditionalPipeline names [module file stem, class name], so that it loads as remote code.
    if isinstance(class_name, list):
        class_name = class_name[-1] if class_name else None
    if class_name != ClassConditionalPipeline.__name__:
        raise ValueError(
            f"PIPELINE_DIR {pipeline_dir!r} contains a {class_name} pipeline, not a "
            f"{ClassConditionalPipeline.__name__}"
        )


def dataset_name_of(pipeline_dir: str, requested: str | None) -> str:
    """Return --dataset_name, or the dataset that the folder's training_config.json names."""
    if requested is not None:
        return requested
    config_path = os.path.join(pipeline_dir, TRAINING_CONFIG)
    try:
        with open(config_path, encoding="utf-8") as handle:
            return json.load(handle)["dataset_name"]
    except (OSError, KeyError, json.JSONDecodeError) as error:
        raise ValueError(
            f"--dataset_name is missing and {config_path} gives none ({error.__class__.__name__}: {error}). Pass "
            "--dataset_name, for example --dataset_name builtin:mnist-5k"
        ) from error


# ---------------------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------------------


class RealReference:
    """Classifier features of the real test split, with their Gaussian fitted once for classifier FID."""

    def __init__(self, features: np.ndarray):
        self.features = features
        self.mean, self.covariance = fit_gaussian(features)

    def subset(self, size: int, seed: int) -> np.ndarray:
        """Return `size` real feature rows drawn without replacement, the same rows for the same seed.

        Precision and recall compare k-nearest-neighbour radii, which shrink as a set grows, so both sets have the
        same size. With fewer real images than `size`, all of them are returned.
        """
        if size >= len(self.features):
            return self.features
        rows = np.random.default_rng(seed).choice(len(self.features), size=size, replace=False)
        return self.features[np.sort(rows)]


def score_samples(classifier, reference: RealReference, images, labels, num_classes: int, seed: int) -> dict:
    """Return class accuracy (overall and per class), classifier FID, precision and recall of one batch of samples."""
    accuracy = class_accuracy_of_samples(classifier, images, labels, num_classes)
    features = classifier.embed(images).double().numpy()
    fake_mean, fake_covariance = fit_gaussian(features)
    fid = gaussian_frechet_distance(reference.mean, reference.covariance, fake_mean, fake_covariance)
    precision, recall = precision_recall(reference.subset(len(features), seed), features, k=PRECISION_RECALL_K)
    scores = {"class_accuracy": accuracy["accuracy"], "classifier_fid": fid, "precision": precision, "recall": recall}
    for class_id, value in enumerate(accuracy["per_class_accuracy"]):
        scores[per_class_column(class_id)] = value
    return scores


def per_class_column(class_id: int) -> str:
    return f"class_accuracy_{class_id}"


def grid_columns_per_seed(num_seeds: int, samples_per_class: int) -> int:
    return min(samples_per_class, max(1, GRID_COLUMNS // num_seeds))


def grid_tiles(images: torch.Tensor, num_classes: int, samples_per_class: int, columns: int) -> torch.Tensor:
    """Return the first `columns` samples of every class, class by class, from a class-balanced batch."""
    per_class = images.reshape(num_classes, samples_per_class, *images.shape[1:])
    return per_class[:, :columns]


def run_sweep(pipe, classifier, reference: RealReference, args, scales: list, scheduler_classes: list):
    """Sample and score every (scheduler, steps, scale, seed), and return the per-seed rows and grid tiles per scale.

    Grids come from the reference setting, the first scheduler with the first step count.
    """
    num_classes = pipe.num_classes
    num_samples = args.samples_per_class * num_classes
    columns = grid_columns_per_seed(len(args.seeds), args.samples_per_class)
    saved_scheduler = pipe.scheduler
    runs = [
        (name, scheduler_cls, steps, scale, seed)
        for name, scheduler_cls in zip(args.schedulers, scheduler_classes)
        for steps in args.num_inference_steps
        for scale in scales
        for seed in args.seeds
    ]
    rows, grids = [], {scale: [] for scale in scales}
    progress = tqdm(runs, desc="guidance sweep", unit="run")
    for name, scheduler_cls, steps, scale, seed in progress:
        progress.set_postfix_str(f"{name}, {steps} steps, s = {scale:g} (w = {guidance_weight(scale):g}), seed {seed}")
        # set_scheduler keeps the noise schedule the UNet was trained on; from_config alone may not (Heun).
        pipe.scheduler = saved_scheduler
        pipe.set_scheduler(scheduler_cls)
        row = {
            "scheduler": name,
            "scheduler_class": scheduler_cls.__name__,
            "num_inference_steps": steps,
            "guidance_scale": scale,
            "guidance_weight": guidance_weight(scale),
            "seed": seed,
            "num_samples": num_samples,
            "error": "",
        }
        try:
            # Seed k owns the generator seeds k * N to k * N + N - 1, so no two seeds share starting noise.
            images, labels = sample_class_balanced(
                pipe, args.samples_per_class, scale, steps, args.batch_size, seed * num_samples, args.mixed_precision,
                clip_sample=CLIP_SAMPLE_CHOICES[args.clip_sample],
            )
        except FloatingPointError as error:
            # One diverging setting (a large scale with few steps, say) must not cost the rest of the sweep.
            logger.warning("Sampling failed with %s, %d steps, s = %g (w = %g), seed %d: %s",
                           name, steps, scale, guidance_weight(scale), seed, error)  # fmt: skip
            row.update({metric: math.nan for metric in METRICS})
            row.update({per_class_column(class_id): math.nan for class_id in range(num_classes)})
            row["error"] = str(error)
            rows.append(row)
            continue
        row.update(score_samples(classifier, reference, images, labels, num_classes, seed))
        rows.append(row)
        if name == args.schedulers[0] and steps == args.num_inference_steps[0]:
            grids[scale].append(grid_tiles(images, num_classes, args.samples_per_class, columns))
    progress.close()
    pipe.scheduler = saved_scheduler
    return rows, grids


# ---------------------------------------------------------------------------------------------------------------------
# Aggregation and choice of scale
# ---------------------------------------------------------------------------------------------------------------------


def metric_columns(rows: list) -> list:
    """Return the metric columns of per-seed rows: the four metrics, then per-class accuracy by class id."""
    per_class = sorted(
        (column for column in rows[0] if column.startswith("class_accuracy_")),
        key=lambda column: int(column.rsplit("_", 1)[1]),
    )
    return [*METRICS, *per_class]


def aggregate_runs(rows: list) -> list:
    """Summarise per-seed rows as one row per setting, in the order the settings first appear.

    Every metric column becomes `<metric>_mean` and `<metric>_std` (sample standard deviation over the seeds, NaN for
    a single seed). `num_seeds` counts the seeds and `num_samples` is the sample count of one seed. A metric that is
    NaN for some seed, because sampling failed there, is NaN in the summary too.
    """
    if not rows:
        raise ValueError("rows must contain at least one run, got none")
    columns = metric_columns(rows)
    groups = {}
    for row in rows:
        key = tuple(row[column] for column in SETTING_COLUMNS)
        groups.setdefault(key, []).append(row)

    summary = []
    for key, group in groups.items():
        sample_counts = {row["num_samples"] for row in group}
        if len(sample_counts) != 1:
            setting = dict(zip(SETTING_COLUMNS, key))
            raise ValueError(f"the runs of setting {setting} differ in num_samples: {sorted(sample_counts)}")
        entry = dict(zip(SETTING_COLUMNS, key))
        entry["num_seeds"] = len(group)
        entry["num_samples"] = sample_counts.pop()
        for column in columns:
            spread = mean_and_spread([row[column] for row in group])
            entry[f"{column}_mean"] = spread.mean
            entry[f"{column}_std"] = spread.std
        summary.append(entry)
    return summary


def best_setting(summary: list, metric: str, higher_is_better: bool) -> dict | None:
    """Return the summary row with the best mean of `metric`, ties broken toward the smaller scale.

    Rows whose mean is NaN are skipped, and None is returned when no row has a value.
    """
    candidates = [row for row in summary if math.isfinite(row[f"{metric}_mean"])]
    if not candidates:
        return None
    sign = -1.0 if higher_is_better else 1.0
    return min(candidates, key=lambda row: (sign * row[f"{metric}_mean"], row["guidance_scale"]))


def recommendations(summary: list, scheduler: str, num_inference_steps: int) -> dict:
    """Return the best classifier FID and the best class accuracy among the scales of one scheduler and step count."""
    rows = [
        row for row in summary if (row["scheduler"], row["num_inference_steps"]) == (scheduler, num_inference_steps)
    ]
    choices = {}
    for key, metric, higher_is_better in (("fid", "classifier_fid", False), ("accuracy", "class_accuracy", True)):
        best = best_setting(rows, metric, higher_is_better)
        choices[key] = None if best is None else {
            "guidance_scale": best["guidance_scale"],
            "guidance_weight": best["guidance_weight"],
            f"{metric}_mean": best[f"{metric}_mean"],
            f"{metric}_std": best[f"{metric}_std"],
            "num_seeds": best["num_seeds"],
            "num_samples": best["num_samples"],
        }  # fmt: skip
    return choices


# ---------------------------------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------------------------------


def write_csv(path: str, rows: list) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def format_spread(mean: float, std: float, kind: str) -> str:
    """Format a mean and its spread over seeds for a table cell. A single seed shows the mean alone."""
    if not math.isfinite(mean):
        return "failed"
    if kind == "percent":
        text, spread = f"{100 * mean:.1f}%", f"{100 * std:.1f}"
    elif kind == "distance":
        text, spread = f"{mean:.4g}", f"{std:.2g}"
    else:
        text, spread = f"{mean:.3f}", f"{std:.3f}"
    return text if not math.isfinite(std) else f"{text} ± {spread}"


def markdown_table(header: list, rows: list) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def write_markdown(path: str, summary: list, context: dict) -> None:
    """Write the summary tables, how to read them, the classifier's ceiling and the recommended scales as markdown."""
    lines = [f"# Guidance sweep of `{context['pipeline_dir']}`", "", *markdown_notes(summary, context)]
    lines += ["", "## Metrics", "", *metrics_table(summary)]
    lines += ["", "## Class accuracy per class", "", "Mean over the seeds.", "", *per_class_table(summary, context)]
    lines += ["", "## Recommended scales", "", *recommendation_lines(context)]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")


def markdown_notes(summary: list, context: dict) -> list:
    ceiling = context["classifier_test_accuracy"]
    ceiling_text = "unknown" if ceiling is None else f"{100 * ceiling:.1f}%"
    seeds = ", ".join(str(seed) for seed in context["seeds"])
    return [
        (
            f"Dataset `{context['dataset']}`. Each setting was sampled with {len(context['seeds'])} seed(s) ({seeds}) "
            f"of {summary[0]['num_samples']} class-balanced samples each ({context['samples_per_class']} per class). "
            f"Clipping of the x_0 estimate: {context['clip_sample']}. Cells show the mean ± sample standard "
            "deviation over the seeds."
        ),
        "",
        (
            "- Guidance scale s mixes eps = eps_null + s (eps_label - eps_null), and w = s - 1 is the weight of Ho & "
            "Salimans (2022). s = 0 (w = -1) is unconditional and s = 1 (w = 0) plain conditional sampling."
        ),
        (
            "- Class accuracy is the share of samples that the evaluation classifier assigns to the requested class. "
            f"The classifier's accuracy on the {context['classifier_test_size']} real test images is {ceiling_text}, "
            "the ceiling for samples."
        ),
        (
            f"- Classifier FID is the Fréchet distance between the classifier's {context['feature_dim']}-d "
            "penultimate features of the samples and of the whole test split. It is not comparable with Inception "
            "FID. Estimated from few samples it is biased upward, so compare it only between runs of the same sample "
            "count."
        ),
        (
            f"- Precision and recall use k-nearest-neighbour manifolds (k = {PRECISION_RECALL_K}) on the same "
            "features. The real set is a random subset of the test split of the same size as the sample set (all of "
            "it when the split is smaller), drawn once per seed, because the neighbour radii depend on the set size."
        ),
    ]


def metrics_table(summary: list) -> list:
    header = ["scheduler", "steps", "s", "w", "class accuracy", "classifier FID", "precision", "recall",
              "seeds × samples"]  # fmt: skip
    return markdown_table(header, [metrics_row_cells(row) for row in summary])


def metrics_row_cells(row: dict) -> list:
    """Return the cells of one summary row under the columns of `metrics_table`."""
    return [
        row["scheduler"],
        row["num_inference_steps"],
        f"{row['guidance_scale']:g}",
        f"{row['guidance_weight']:g}",
        format_spread(row["class_accuracy_mean"], row["class_accuracy_std"], "percent"),
        format_spread(row["classifier_fid_mean"], row["classifier_fid_std"], "distance"),
        format_spread(row["precision_mean"], row["precision_std"], "share"),
        format_spread(row["recall_mean"], row["recall_std"], "share"),
        f"{row['num_seeds']} × {row['num_samples']}",
    ]


def per_class_table(summary: list, context: dict) -> list:
    class_ids = sorted(context["id2label"])
    header = ["scheduler", "steps", "s", "w", *(str(context["id2label"][class_id]) for class_id in class_ids)]
    cells = []
    for row in summary:
        setting = [row["scheduler"], row["num_inference_steps"], f"{row['guidance_scale']:g}",
                   f"{row['guidance_weight']:g}"]  # fmt: skip
        means = [f"{100 * row[f'{per_class_column(class_id)}_mean']:.1f}%" for class_id in class_ids]
        cells.append(setting + means)
    return markdown_table(header, cells)


def recommendation_lines(context: dict) -> list:
    reference = context["reference_setting"]
    lines = [
        (
            f"Among the scales of the reference setting, {reference['scheduler']} with "
            f"{reference['num_inference_steps']} steps. Ties go to the smaller scale."
        ),
        "",
    ]
    for key, metric, kind in (("fid", "classifier_fid", "distance"), ("accuracy", "class_accuracy", "percent")):
        choice = context["recommendations"][key]
        if choice is None:
            lines.append(f"- {RECOMMENDATION_LABELS[key]}: none, because every run of the reference setting failed")
            continue
        value = format_spread(choice[f"{metric}_mean"], choice[f"{metric}_std"], kind)
        lines.append(
            f"- {RECOMMENDATION_LABELS[key]}: s = {choice['guidance_scale']:g} (w = {choice['guidance_weight']:g}), "
            f"{value}"
        )

    change = context["default_guidance_scale"]
    if change is not None:
        lines.append(
            f"- `default_guidance_scale` in `{PIPELINE_INDEX}` set from {change['previous']:g} to "
            f"s = {change['new']:g} (w = {guidance_weight(change['new']):g}), the scale with the "
            f"{RECOMMENDATION_LABELS[change['source']]}"
        )
    return lines


def plot_sweep(path: str, summary: list, ceiling: float | None) -> None:
    """Plot class accuracy, classifier FID, precision and recall against w, one line per scheduler and step count."""
    settings = list(dict.fromkeys((row["scheduler"], row["num_inference_steps"]) for row in summary))
    lines = {
        f"{scheduler}, {steps} steps": [
            row for row in summary if (row["scheduler"], row["num_inference_steps"]) == (scheduler, steps)
        ]
        for scheduler, steps in settings
    }
    plot_metric_lines(path, lines, ceiling, "Guidance sweep: mean ± standard deviation over seeds")


def plot_metric_lines(path: str, lines: dict, ceiling: float | None, title: str) -> None:
    """Plot the four metrics against w in a 2 x 2 figure, one line per entry of `lines` (label -> summary rows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("class_accuracy", "class accuracy"),
        ("classifier_fid", "classifier FID (not Inception FID)"),
        ("precision", "precision"),
        ("recall", "recall"),
    )
    swept_weights = sorted({row["guidance_weight"] for rows in lines.values() for row in rows})
    figure, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for axis, (metric, panel_title) in zip(axes.flat, panels):
        for label, rows in lines.items():
            weights = [row["guidance_weight"] for row in rows]
            means = [row[f"{metric}_mean"] for row in rows]
            # A single seed has no spread: draw no error bar rather than a zero-length one.
            spreads = [row[f"{metric}_std"] if math.isfinite(row[f"{metric}_std"]) else 0.0 for row in rows]
            axis.errorbar(weights, means, yerr=spreads, marker="o", capsize=3, label=label)
        if metric == "class_accuracy" and ceiling is not None:
            axis.axhline(ceiling, color="gray", linestyle="--", label="classifier on real test images")
        # symlog keeps w = -1 and w = 0 visible next to w = 20. The ticks are the swept weights.
        axis.set_xscale("symlog", linthresh=1.0)
        axis.set_xticks(swept_weights, labels=[f"{weight:g}" for weight in swept_weights])
        axis.minorticks_off()
        axis.set_xlabel("guidance weight w (scale s = w + 1)")
        axis.set_title(panel_title)
        axis.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    figure.suptitle(title)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def grid_file_name(scale: float) -> str:
    return f"grid_w{guidance_weight(scale):g}.png"


def write_grids(output_dir: str, grids: dict) -> dict:
    """Save one grid per scale (rows: classes, columns: samples grouped by seed) and return the paths by scale."""
    paths = {}
    for scale, per_seed in grids.items():
        if not per_seed:
            continue
        # per_seed contains one (classes, columns, C, H, W) tensor per seed. Join them side by side.
        tiles = torch.cat(per_seed, dim=1)
        num_classes, num_columns = tiles.shape[:2]
        path = os.path.join(output_dir, grid_file_name(scale))
        image_grid(tiles.flatten(0, 1), rows=num_classes, cols=num_columns).save(path)
        paths[scale] = path
    return paths


def set_default_guidance_scale(pipeline_dir: str, guidance_scale: float) -> float:
    """Write `guidance_scale` into the folder's model_index.json as default_guidance_scale; return the previous default.

    Only model_index.json changes, and the UNet and scheduler files stay as they are. The new content goes to a
    temporary file in the same folder, which os.replace then moves over the old file, so an interrupted write leaves
    the old file whole.
    """
    index_path = os.path.join(pipeline_dir, PIPELINE_INDEX)
    with open(index_path, encoding="utf-8") as handle:
        index = json.load(handle)
    init_default = inspect.signature(ClassConditionalPipeline.__init__).parameters["default_guidance_scale"].default
    previous = float(index.get("default_guidance_scale", init_default))
    index["default_guidance_scale"] = float(guidance_scale)

    # The same layout as diffusers' save_pretrained writes, so that a later save_pretrained shows a small diff.
    content = json.dumps(index, indent=2, sort_keys=True) + "\n"
    mode = stat.S_IMODE(os.stat(index_path).st_mode)
    descriptor, temporary_path = tempfile.mkstemp(dir=pipeline_dir, prefix=f".{PIPELINE_INDEX}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file readable by its owner only. Keep the permissions of the old file.
        os.chmod(temporary_path, mode)
        os.replace(temporary_path, index_path)
    except BaseException:
        os.unlink(temporary_path)
        raise
    return previous


def check_set_default_writable(pipeline_dir: str) -> None:
    """Raise a ValueError unless --set_default can replace model_index.json and rewrite README.md in `pipeline_dir`."""
    if not os.access(pipeline_dir, os.W_OK | os.X_OK):
        raise ValueError(
            f"--set_default needs to write {PIPELINE_INDEX} in PIPELINE_DIR {pipeline_dir!r}, but the folder is not "
            "writable. Make it writable, or omit --set_default and set the scale later"
        )
    card_path = os.path.join(pipeline_dir, CARD_FILENAME)
    if os.path.isfile(card_path) and not os.access(card_path, os.W_OK):
        raise ValueError(f"--set_default needs to update the model card {card_path!r}, but the file is not writable. "
                         "Make it writable, or omit --set_default")  # fmt: skip


def training_card_of(pipeline_dir: str) -> dict | None:
    """Return the model card fields that training rendered the folder's README.md from, or None without them.

    The fields come from the training report (eval_results.json). A folder without that report has no card or one
    that training did not write, and rendering a new card there would overwrite the existing card's content.
    """
    report_path = os.path.join(pipeline_dir, TRAINING_REPORT_FILENAME)
    if not os.path.isfile(report_path):
        return None
    with open(report_path, encoding="utf-8") as handle:
        try:
            report = json.load(handle)
        except json.JSONDecodeError as error:
            raise ValueError(f"{report_path} is not valid JSON ({error}), so the model card cannot be rendered "
                             "again. Restore the file or remove it to leave the card as it is") from error  # fmt: skip
    if not isinstance(report, dict) or "training" not in report:
        return None
    return training_card_fields(report)


def recommendation_source(
    key: str, choice: dict, reference_setting: dict, scales: list, clip_sample: str, scheduler_clips: bool
) -> str:
    """Describe for the model card how the sweep chose the recommended scale.

    `clip_sample` is the --clip_sample choice and `scheduler_clips` whether the saved scheduler clips by default.
    When the two differ, the card states it, because the pipeline follows its scheduler config unless the caller
    passes clip_sample.
    """
    source = (
        f"Chosen by diffusers-cfg-sweep as the scale with the {RECOMMENDATION_LABELS[key]} among s = "
        f"{', '.join(f'{scale:g}' for scale in scales)}, sampled with {reference_setting['scheduler']} in "
        f"{reference_setting['num_inference_steps']} steps, {choice['num_samples']} images per seed, mean over "
        f"{choice['num_seeds']} seed(s)."
    )
    sweep_clips = CLIP_SAMPLE_CHOICES[clip_sample]
    if sweep_clips is not None and sweep_clips != scheduler_clips:
        state, default = ("on", "without clipping") if sweep_clips else ("off", "with clipping")
        source += (
            f" Clipping of the x_0 estimate was {state} in the sweep (--clip_sample {clip_sample}), but the pipeline "
            f"samples {default} by default: pass clip_sample={sweep_clips} to sample as the sweep did."
        )
    return source


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    """Run the sweep command; the console script exits with status 0 when this returns."""
    run(argv)


def run(argv=None) -> dict:
    """Run the sweep from command-line arguments and return the content of sweep.json.

    Invalid input and failed file writes exit with a one-line error.
    """
    args = parse_args(argv)
    configure_logging(logger)
    try:
        return sweep(args)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from error


def sweep(args: argparse.Namespace) -> dict:
    """Run the sweep, write every report and return the content of sweep.json."""
    # 1. Check everything that is cheap to check before loading models
    scales = guidance_scales_from_args(args)
    check_args(args)
    scheduler_classes = resolve_schedulers(args.schedulers)
    check_pipeline_dir(args.pipeline_dir)
    dataset_name = dataset_name_of(args.pipeline_dir, args.dataset_name)
    output_dir = args.output_dir or os.path.join(args.pipeline_dir, DEFAULT_OUTPUT_FOLDER)
    check_output_folder("--output_dir", output_dir)
    card_fields = None
    if args.set_default != "none":
        check_set_default_writable(args.pipeline_dir)
        card_fields = training_card_of(args.pipeline_dir)
    device = resolve_device("--device", args.device)

    # 2. Pipeline, data, classifier and the real reference features
    pipe = ClassConditionalPipeline.from_pretrained(args.pipeline_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    train_steps = pipe.scheduler.config.num_train_timesteps
    for steps in args.num_inference_steps:
        if steps > train_steps:
            raise ValueError(
                f"--num_inference_steps {steps} is invalid: the model was trained with {train_steps} steps"
            )
    num_samples = args.samples_per_class * pipe.num_classes
    if num_samples <= PRECISION_RECALL_K:
        raise ValueError(
            f"--samples_per_class {args.samples_per_class} gives {num_samples} samples per seed, too few for "
            f"precision and recall with k = {PRECISION_RECALL_K}. Use at least {PRECISION_RECALL_K + 1} samples"
        )
    data = load_labeled_images(dataset_name)
    if data.num_classes != pipe.num_classes:
        raise ValueError(
            f"--dataset_name {dataset_name!r} has {data.num_classes} classes, but the pipeline in "
            f"{args.pipeline_dir!r} has {pipe.num_classes}. Give the dataset the pipeline was trained on"
        )
    if "test" not in data.splits:
        raise ValueError(
            f"--dataset_name {dataset_name!r} has no 'test' split, which classifier FID and precision and recall "
            f"need as the real reference. Its splits are {list(data.splits)}"
        )
    sample_size = pipe.unet.config.sample_size
    resolution = sample_size if isinstance(sample_size, int) else sample_size[0]
    channels = pipe.unet.config.in_channels
    classifier, classifier_info = load_or_train_classifier(data, resolution, channels)
    test_images, _ = split_as_tensors(data, "test", resolution, channels)
    reference = RealReference(classifier.embed(test_images).double().numpy())
    # s = 0 and s = 1 need one UNet pass per image and step, any other scale two. Second-order schedulers such as
    # Heun evaluate the UNet about twice per step, so for them the count is a lower bound.
    passes_per_step = sum(1 if scale in (0.0, 1.0) else 2 for scale in scales)
    unet_evaluations = passes_per_step * len(args.schedulers) * sum(args.num_inference_steps) * len(args.seeds)
    logger.info(
        "Sweeping %d scales x %d scheduler(s) x %d step count(s) x %d seed(s) of %d samples each on %s: "
        "at least %d UNet evaluations of one image",
        len(scales), len(args.schedulers), len(args.num_inference_steps), len(args.seeds), num_samples, device,
        unet_evaluations * num_samples,
    )  # fmt: skip

    # 3. Sample and score every setting
    rows, grids = run_sweep(pipe, classifier, reference, args, scales, scheduler_classes)
    summary = aggregate_runs(rows)
    reference_setting = {"scheduler": args.schedulers[0], "num_inference_steps": args.num_inference_steps[0]}
    choices = recommendations(summary, **reference_setting)

    # 4. Reports, written before --set_default touches the pipeline folder so that a failure there keeps them
    os.makedirs(output_dir, exist_ok=True)
    paths = {
        "per-seed table": os.path.join(output_dir, "sweep.csv"),
        "summary table": os.path.join(output_dir, "sweep_summary.csv"),
        "markdown report": os.path.join(output_dir, "sweep.md"),
        "plot": os.path.join(output_dir, "sweep.png"),
        "recommendations": os.path.join(output_dir, "sweep.json"),
    }
    write_csv(paths["per-seed table"], rows)
    write_csv(paths["summary table"], summary)
    plot_sweep(paths["plot"], summary, classifier_info.get("test_accuracy"))
    grid_paths = write_grids(output_dir, grids)
    context = {
        "pipeline_dir": args.pipeline_dir,
        "dataset": dataset_name,
        "seeds": args.seeds,
        "samples_per_class": args.samples_per_class,
        "clip_sample": args.clip_sample,
        "id2label": {class_id: data.id2label.get(class_id, str(class_id)) for class_id in range(pipe.num_classes)},
        "classifier_test_accuracy": classifier_info.get("test_accuracy"),
        "classifier_test_size": len(test_images),
        "feature_dim": reference.features.shape[1],
        "reference_setting": reference_setting,
        "recommendations": choices,
        "default_guidance_scale": None,
    }
    report = {
        "pipeline_dir": os.path.abspath(args.pipeline_dir),
        "dataset": dataset_name,
        "classifier": {"test_accuracy": classifier_info.get("test_accuracy"), "test_size": len(test_images)},
        "reference_setting": reference_setting,
        "best_fid": choices["fid"],
        "best_accuracy": choices["accuracy"],
        "best_by_setting": [
            {"scheduler": name, "num_inference_steps": steps, **recommendations(summary, name, steps)}
            for name in args.schedulers
            for steps in args.num_inference_steps
        ],
        "default_guidance_scale": None,
        "settings": {
            "guidance_scales": scales,
            "guidance_weights": [guidance_weight(scale) for scale in scales],
            "schedulers": args.schedulers,
            "num_inference_steps": args.num_inference_steps,
            "samples_per_class": args.samples_per_class,
            "seeds": args.seeds,
            "mixed_precision": args.mixed_precision,
            "clip_sample": args.clip_sample,
            "precision_recall_k": PRECISION_RECALL_K,
        },
        "files": {**paths, "grids": {f"{scale:g}": path for scale, path in grid_paths.items()}},
    }
    write_markdown(paths["markdown report"], summary, context)
    write_report(paths["recommendations"], report)

    # 5. Optionally make the chosen scale the pipeline's default and the model card's recommendation, then record
    # the change in sweep.md and sweep.json
    if args.set_default != "none":
        scheduler_clips = bool(pipe.scheduler.config.get("clip_sample", False)
                               or pipe.scheduler.config.get("thresholding", False))  # fmt: skip
        change = apply_default_scale(args, choices, reference_setting, scales, card_fields, scheduler_clips, output_dir)
        context["default_guidance_scale"] = report["default_guidance_scale"] = change
        write_markdown(paths["markdown report"], summary, context)
        write_report(paths["recommendations"], report)

    print_summary(report, paths, grid_paths)
    return report


def apply_default_scale(
    args, choices: dict, reference_setting: dict, scales: list, card_fields: dict | None, scheduler_clips: bool,
    output_dir: str,
) -> dict:
    """Write the --set_default choice into model_index.json and the model card; return the change for the reports."""
    choice = choices[args.set_default]
    if choice is None:
        raise ValueError(f"--set_default {args.set_default}: every run of the reference setting failed, so no "
                         f"scale was chosen. The pipeline is unchanged, and the reports are in {output_dir}")  # fmt: skip
    try:
        previous = set_default_guidance_scale(args.pipeline_dir, choice["guidance_scale"])
    except OSError as error:
        raise ValueError(
            f"--set_default {args.set_default}: writing {PIPELINE_INDEX} in {args.pipeline_dir!r} failed "
            f"({error.__class__.__name__}: {error}). The pipeline is unchanged, and the reports are in {output_dir}"
        ) from error

    card_path = None
    if card_fields is not None:
        card_fields["guidance_scale"] = choice["guidance_scale"]
        card_fields["guidance_scale_source"] = recommendation_source(
            args.set_default, choice, reference_setting, scales, args.clip_sample, scheduler_clips
        )
        card_path = str(write_model_card(args.pipeline_dir, **card_fields))
    elif os.path.isfile(os.path.join(args.pipeline_dir, CARD_FILENAME)):
        logger.warning(
            "%s still recommends its old guidance scale: the folder has no %s with the training settings to "
            "render it from, so update its recommended scale to s = %g by hand.",
            os.path.join(args.pipeline_dir, CARD_FILENAME), TRAINING_REPORT_FILENAME, choice["guidance_scale"],
        )  # fmt: skip
    return {"source": args.set_default, "previous": previous, "new": choice["guidance_scale"], "model_card": card_path}


def write_report(path: str, report: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(without_nan(report), handle, indent=2, allow_nan=False)


def without_nan(value):
    """Return a copy of nested dicts and lists with NaN floats replaced by None, which JSON can store."""
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_nan(item) for item in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def print_summary(report: dict, paths: dict, grid_paths: dict) -> None:
    reference = report["reference_setting"]
    lines = [
        (
            f"Guidance sweep of {report['pipeline_dir']} on {report['dataset']}, recommended scales for "
            f"{reference['scheduler']} with {reference['num_inference_steps']} steps:"
        )
    ]
    for key in ("fid", "accuracy"):
        choice = report[f"best_{key}"]
        if choice is None:
            lines.append(f"  {RECOMMENDATION_LABELS[key]}: none, because every run failed")
        else:
            scale, weight = choice["guidance_scale"], choice["guidance_weight"]
            lines.append(f"  {RECOMMENDATION_LABELS[key]}: s = {scale:g} (w = {weight:g})")
    change = report["default_guidance_scale"]
    if change is not None:
        lines.append(f"Set default_guidance_scale in {os.path.join(report['pipeline_dir'], PIPELINE_INDEX)} from "
                     f"{change['previous']:g} to {change['new']:g}")  # fmt: skip
        if change["model_card"] is not None:
            lines.append(f"Wrote the model card {change['model_card']} again with s = {change['new']:g} as the "
                         "recommended scale")  # fmt: skip
    lines.append("Wrote:")
    lines += [f"  {name}: {path}" for name, path in paths.items()]
    for scale, path in grid_paths.items():
        lines.append(f"  sample grid s = {scale:g} (w = {guidance_weight(scale):g}): {path}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
