"""Tests of the guidance sweep command: aggregation, choice of scale, input checks, and a sweep run end to end.

The end-to-end runs sample an untrained tiny pipeline at 8x8 and score it with a classifier trained for six
epochs on builtin:digits, which replaces the cached classifier so that the file stays fast.
"""

import contextlib
import csv
import io
import json
import logging
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from command_helpers import printed_values, script_env
from PIL import Image
from safetensors.torch import save_file
from threadpoolctl import threadpool_limits
from training_helpers import run_main, tiny_argv

from diffusers_cfg.pipelines import ClassConditionalPipeline
from diffusers_cfg.training import classifier as classifier_module
from diffusers_cfg.training import guidance_sweep
from diffusers_cfg.training.classifier import train_classifier
from diffusers_cfg.training.data import load_labeled_images
from diffusers_cfg.training.evaluation import sample_class_balanced
from diffusers_cfg.training.model import build_noise_scheduler, build_unet, sampling_scheduler

NUM_CLASSES = 10
SAMPLES_PER_CLASS = 3
SEEDS = [0, 1]
WEIGHTS = [0.0, 2.0]  # scales s = 1 and 3, neither equal to the saved default of 4
SCHEDULERS = ["ddim", "dpm++"]
STEPS = [2, 3]
SAVED_DEFAULT_SCALE = 4.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny models and 128 x 128 covariances gain nothing from a second thread. On two cores that other processes
    # kept busy, two threads made one pipeline call about 40 times slower than one thread did, and one `eigh` of the
    # Fréchet distance took 0.4 s. threadpoolctl (a scikit-learn dependency) limits numpy's BLAS.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """An untrained tiny pipeline for builtin:digits, saved with a training_config.json as training saves it."""
    folder = tmp_path_factory.mktemp("pipeline") / "cfg-digits"
    torch.manual_seed(0)
    unet = build_unet(8, 1, NUM_CLASSES, block_out_channels=(8, 16))
    pipe = ClassConditionalPipeline(
        unet=unet,
        scheduler=sampling_scheduler(build_noise_scheduler()),
        id2label={class_id: str(class_id) for class_id in range(NUM_CLASSES)},
        default_guidance_scale=SAVED_DEFAULT_SCALE,
    )
    pipe.save_pretrained(folder)
    config = {"dataset_name": "builtin:digits", "resolution": 8, "channels": 1}
    (folder / "training_config.json").write_text(json.dumps(config))
    (folder / "README.md").write_text("model card\n")
    return folder


@pytest.fixture(scope="module")
def quick_classifier():
    """A real SampleClassifier trained briefly on builtin:digits, with the info dict of the cached one."""
    data = load_labeled_images("builtin:digits")
    model, test_accuracy = train_classifier(data, 8, 1, min_steps=60, max_epochs=6)
    return model, {"test_accuracy": test_accuracy, "test_size": len(data.splits["test"])}


@contextlib.contextmanager
def patched_classifier(classifier, cache_dir):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIFFUSERS_CFG_CACHE", str(cache_dir))
        patch.setattr(guidance_sweep, "load_or_train_classifier", lambda data, resolution, channels: classifier)
        yield


def run_sweep_command(argv, classifier, cache_dir):
    """Run main(argv) with the quick classifier; return sweep.json's content and the printed output."""
    output = io.StringIO()
    with patched_classifier(classifier, cache_dir), contextlib.redirect_stdout(output):
        report = guidance_sweep.run(argv)
    return report, output.getvalue()


@pytest.fixture(scope="module")
def sweep_run(pipeline_dir, quick_classifier, tmp_path_factory):
    """One sweep over 2 schedulers x 2 step counts x 2 scales x 2 seeds, without --set_default."""
    index_before = (pipeline_dir / "model_index.json").read_bytes()
    output_dir = tmp_path_factory.mktemp("sweep")
    argv = [
        str(pipeline_dir),
        "--guidance_weights", *map(str, WEIGHTS),
        "--schedulers", *SCHEDULERS,
        "--num_inference_steps", *map(str, STEPS),
        "--samples_per_class", str(SAMPLES_PER_CLASS),
        "--seeds", *map(str, SEEDS),
        "--output_dir", str(output_dir),
    ]  # fmt: skip
    sampler_calls = []

    def recording_sampler(pipe, samples_per_class, guidance_scale, num_inference_steps, batch_size, seed, *args,
                          **kwargs):  # fmt: skip
        sampler_calls.append({"scheduler_class": pipe.scheduler.__class__.__name__, "guidance_scale": guidance_scale,
                              "num_inference_steps": num_inference_steps, "first_seed": seed,
                              "num_images": samples_per_class * pipe.num_classes,
                              "clip_sample": kwargs.get("clip_sample")})  # fmt: skip
        return sample_class_balanced(
            pipe, samples_per_class, guidance_scale, num_inference_steps, batch_size, seed, *args, **kwargs
        )

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(guidance_sweep, "sample_class_balanced", recording_sampler)
        report, printed = run_sweep_command(argv, quick_classifier, tmp_path_factory.mktemp("cache"))
    return {
        "report": report,
        "printed": printed,
        "output_dir": output_dir,
        "index_before": index_before,
        "index_after": (pipeline_dir / "model_index.json").read_bytes(),
        "sampler_calls": sampler_calls,
    }


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def markdown_rows(text, heading):
    """Return the header and the body rows of the first markdown table after a heading, as lists of cells."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("|"))
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return table[0], table[2:]


# ---------------------------------------------------------------------------------------------------------------------
# Units
# ---------------------------------------------------------------------------------------------------------------------


def make_run(scheduler, steps, scale, seed, accuracy, fid, per_class):
    row = {"scheduler": scheduler, "scheduler_class": scheduler.upper(), "num_inference_steps": steps,
           "guidance_scale": scale, "guidance_weight": scale - 1, "seed": seed, "num_samples": 20, "error": "",
           "class_accuracy": accuracy, "classifier_fid": fid, "precision": 0.5, "recall": 0.25}  # fmt: skip
    row.update({f"class_accuracy_{class_id}": value for class_id, value in enumerate(per_class)})
    return row


def test_aggregate_runs_mean_and_spread():
    rows = [
        make_run("ddim", 2, 3.0, 0, accuracy=0.5, fid=10.0, per_class=[0.4, 0.6]),
        make_run("euler", 2, 1.0, 0, accuracy=0.9, fid=2.0, per_class=[1.0, 0.8]),
        make_run("ddim", 2, 3.0, 1, accuracy=0.7, fid=14.0, per_class=[0.8, 0.6]),
        make_run("ddim", 2, 3.0, 2, accuracy=0.9, fid=18.0, per_class=[1.0, 0.8]),
    ]
    summary = guidance_sweep.aggregate_runs(rows)

    assert [(row["scheduler"], row["guidance_scale"]) for row in summary] == [("ddim", 3.0), ("euler", 1.0)]
    ddim, euler = summary
    assert ddim["num_seeds"] == 3
    assert ddim["num_samples"] == 20
    assert ddim["guidance_weight"] == 2.0
    assert ddim["class_accuracy_mean"] == pytest.approx(0.7)
    assert ddim["class_accuracy_std"] == pytest.approx(0.2)  # deviations -0.2, 0, 0.2 over 3 - 1 degrees of freedom
    assert ddim["classifier_fid_mean"] == pytest.approx(14.0)
    assert ddim["classifier_fid_std"] == pytest.approx(4.0)
    assert ddim["precision_std"] == pytest.approx(0.0)
    assert ddim["class_accuracy_0_mean"] == pytest.approx(2.2 / 3)
    assert ddim["class_accuracy_0_std"] == pytest.approx(np.std([0.4, 0.8, 1.0], ddof=1))
    assert ddim["class_accuracy_1_mean"] == pytest.approx(2.0 / 3)
    assert euler["num_seeds"] == 1
    assert euler["class_accuracy_mean"] == pytest.approx(0.9)
    assert math.isnan(euler["class_accuracy_std"]), "one seed has no spread, not a spread of 0"


def test_aggregate_runs_propagates_failed_run():
    rows = [
        make_run("ddim", 2, 3.0, 0, accuracy=0.5, fid=10.0, per_class=[0.4, 0.6]),
        make_run("ddim", 2, 3.0, 1, accuracy=math.nan, fid=math.nan, per_class=[math.nan, math.nan]),
    ]
    (summary,) = guidance_sweep.aggregate_runs(rows)
    assert math.isnan(summary["classifier_fid_mean"])
    cell = guidance_sweep.format_spread(summary["classifier_fid_mean"], summary["classifier_fid_std"], "distance")
    assert cell == "failed"


def test_aggregate_runs_rejects_mixed_sample_counts():
    rows = [make_run("ddim", 2, 3.0, seed, 0.5, 10.0, [0.5]) for seed in (0, 1)]
    rows[1]["num_samples"] = 40
    with pytest.raises(ValueError, match="num_samples"):
        guidance_sweep.aggregate_runs(rows)


def summary_row(scale, accuracy, fid):
    return {"scheduler": "ddim", "num_inference_steps": 2, "guidance_scale": scale, "guidance_weight": scale - 1,
            "num_seeds": 2, "num_samples": 20, "class_accuracy_mean": accuracy, "class_accuracy_std": 0.01,
            "classifier_fid_mean": fid, "classifier_fid_std": 0.5}  # fmt: skip


def test_best_setting_breaks_ties_toward_smaller_scale():
    summary = [summary_row(6.0, 0.9, 5.0), summary_row(3.0, 0.9, 7.0), summary_row(1.0, 0.4, 5.0),
               summary_row(0.0, math.nan, math.nan)]  # fmt: skip

    assert guidance_sweep.best_setting(summary, "class_accuracy", higher_is_better=True)["guidance_scale"] == 3.0
    assert guidance_sweep.best_setting(summary, "classifier_fid", higher_is_better=False)["guidance_scale"] == 1.0
    choices = guidance_sweep.recommendations(summary, "ddim", 2)
    assert choices["accuracy"]["guidance_scale"] == 3.0
    assert choices["accuracy"]["guidance_weight"] == 2.0
    assert choices["fid"]["classifier_fid_mean"] == 5.0


def test_best_setting_skips_failed_settings():
    summary = [summary_row(2.0, math.nan, math.nan), summary_row(3.0, 0.2, 9.0)]
    assert guidance_sweep.best_setting(summary, "class_accuracy", higher_is_better=True)["guidance_scale"] == 3.0
    assert guidance_sweep.best_setting(summary[:1], "classifier_fid", higher_is_better=False) is None
    assert guidance_sweep.recommendations(summary, "dpm++", 2) == {"fid": None, "accuracy": None}


def test_guidance_scales_from_weights_or_scales():
    default = guidance_sweep.parse_args(["folder"])
    assert guidance_sweep.guidance_scales_from_args(default) == [0.0, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 11.0, 21.0]
    weights = guidance_sweep.parse_args(["folder", "--guidance_weights", "3", "-1", "3"])
    assert guidance_sweep.guidance_scales_from_args(weights) == [0.0, 4.0]
    scales = guidance_sweep.parse_args(["folder", "--guidance_scales", "2", "0.5"])
    assert guidance_sweep.guidance_scales_from_args(scales) == [0.5, 2.0]


def test_weights_and_scales_are_exclusive(capsys):
    with pytest.raises(SystemExit) as raised:
        guidance_sweep.parse_args(["folder", "--guidance_weights", "1", "--guidance_scales", "2"])
    assert raised.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_real_reference_subset():
    features = np.arange(40.0).reshape(20, 2)
    reference = guidance_sweep.RealReference(features)
    subset = reference.subset(5, seed=3)
    assert subset.shape == (5, 2)
    assert len({tuple(row) for row in subset}) == 5, "rows are drawn without replacement"
    np.testing.assert_array_equal(subset, reference.subset(5, seed=3))
    assert not np.array_equal(subset, reference.subset(5, seed=4))
    np.testing.assert_array_equal(reference.subset(30, seed=3), features)


@pytest.mark.parametrize(
    ("extra_args", "message"),
    [
        (["--guidance_scales", "-0.5"], "--guidance_scales -0.5 is invalid"),
        (["--guidance_weights", "1", "-2"], "--guidance_weights -2 is invalid: it gives the scale s = w [+] 1 = -1"),
        (["--schedulers", "ddim", "no-such-sampler"], "--schedulers 'no-such-sampler' is not a diffusers scheduler"),
        (["--num_inference_steps", "0"], "--num_inference_steps 0 is invalid"),
        (["--num_inference_steps", "5000"], "--num_inference_steps 5000 is invalid: the model was trained with 1000"),
        (["--samples_per_class", "0"], "--samples_per_class 0 is invalid"),
        (["--seeds", "-1"], "--seeds -1 is invalid"),
        (["--seeds", "3", "3"], r"--seeds lists \[3\] more than once"),
        (["--dataset_name", "builtin:no-such-set"], "no-such-set"),
        (["--device", "banana"], "--device 'banana' is not a torch device"),
        (["--device", "meta"], "--device 'meta' cannot sample"),
    ],
)
def test_invalid_input_names_flag_and_value(pipeline_dir, tmp_path, extra_args, message):
    output_dir = tmp_path / "sweep"
    with pytest.raises(SystemExit, match=message):
        guidance_sweep.main([str(pipeline_dir), "--output_dir", str(output_dir), *extra_args])
    assert not output_dir.exists(), "nothing is written for invalid input"


def test_folder_that_is_not_a_pipeline(tmp_path):
    with pytest.raises(SystemExit, match=f"PIPELINE_DIR '{tmp_path}' is not a saved pipeline: it has no model_index"):
        guidance_sweep.main([str(tmp_path)])
    missing = tmp_path / "missing"
    with pytest.raises(SystemExit, match=f"PIPELINE_DIR '{missing}' is not a folder"):
        guidance_sweep.main([str(missing)])
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    with pytest.raises(SystemExit, match="contains a DDPMPipeline pipeline, not a ClassConditionalPipeline"):
        guidance_sweep.main([str(tmp_path)])


def test_dataset_name_required_without_training_config(pipeline_dir, tmp_path):
    folder = tmp_path / "no-config"
    shutil.copytree(pipeline_dir, folder)
    (folder / "training_config.json").unlink()
    with pytest.raises(SystemExit, match="--dataset_name is missing"):
        guidance_sweep.main([str(folder)])


# ---------------------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------------------


def test_sweep_writes_every_file(sweep_run):
    output_dir = sweep_run["output_dir"]
    for name in ("sweep.csv", "sweep_summary.csv", "sweep.md", "sweep.png", "sweep.json"):
        assert (output_dir / name).stat().st_size > 0, f"{name} is missing or empty"
    with Image.open(output_dir / "sweep.png") as plot:
        assert plot.format == "PNG"

    # One grid per scale, named by w: a row per class, columns of min(3 samples, 8 // 2 seeds) per seed.
    grids = sorted(path.name for path in output_dir.glob("grid_w*.png"))
    assert grids == ["grid_w0.png", "grid_w2.png"]
    for name in grids:
        with Image.open(output_dir / name) as grid:
            assert grid.size == (len(SEEDS) * SAMPLES_PER_CLASS * 8, NUM_CLASSES * 8)
            assert grid.mode == "L", "a grayscale pipeline's grid must stay grayscale"

    printed = sweep_run["printed"]
    for path in (output_dir / name for name in ("sweep.csv", "sweep_summary.csv", "sweep.md", "sweep.png",
                                                 "sweep.json", *grids)):  # fmt: skip
        assert str(path) in printed, f"the summary does not say where {path.name} went"
    assert "s = 3 (w = 2)" in printed


def test_sweep_csv_row_per_run(sweep_run):
    rows = read_csv(sweep_run["output_dir"] / "sweep.csv")
    settings = [(row["scheduler"], int(row["num_inference_steps"]), float(row["guidance_scale"]), int(row["seed"]))
                for row in rows]  # fmt: skip
    expected = [(name, steps, weight + 1, seed) for name in SCHEDULERS for steps in STEPS for weight in WEIGHTS
                for seed in SEEDS]  # fmt: skip
    assert sorted(settings) == sorted(expected)

    per_class = [f"class_accuracy_{class_id}" for class_id in range(NUM_CLASSES)]
    for row in rows:
        assert float(row["guidance_weight"]) == float(row["guidance_scale"]) - 1
        assert int(row["num_samples"]) == SAMPLES_PER_CLASS * NUM_CLASSES
        assert row["error"] == ""
        for column in ("class_accuracy", "precision", "recall", *per_class):
            assert 0.0 <= float(row[column]) <= 1.0, (column, row)
        assert math.isfinite(float(row["classifier_fid"])), row
        assert float(row["classifier_fid"]) >= 0, row
        # Balanced classes: the overall accuracy is the mean of the per-class accuracies.
        assert float(row["class_accuracy"]) == pytest.approx(np.mean([float(row[column]) for column in per_class]))


def test_sweep_samples_every_setting(sweep_run):
    calls = sweep_run["sampler_calls"]
    scheduler_classes = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler"}
    expected = [(scheduler_classes[name], steps, weight + 1) for name in SCHEDULERS for steps in STEPS
                for weight in WEIGHTS for _ in SEEDS]  # fmt: skip
    sampled = [(call["scheduler_class"], call["num_inference_steps"], call["guidance_scale"]) for call in calls]
    assert sampled == expected

    # Image i of a call uses generator seed first_seed + i, so the seeds must own disjoint ranges of generator seeds.
    num_images = SAMPLES_PER_CLASS * NUM_CLASSES
    assert {call["num_images"] for call in calls} == {num_images}
    assert {call["first_seed"] for call in calls} == {seed * num_images for seed in SEEDS}
    assert {call["clip_sample"] for call in calls} == {None}, "--clip_sample auto leaves clipping to the scheduler"


@pytest.mark.parametrize("choice, expected", [("on", True), ("off", False), ("auto", None)])
def test_clip_sample_reaches_pipeline(pipeline_dir, quick_classifier, monkeypatch, choice, expected):
    received = []

    def recording_sampler(pipe, *args, **kwargs):
        received.append(kwargs.get("clip_sample", "missing"))
        return sample_class_balanced(pipe, *args, **kwargs)

    monkeypatch.setattr(guidance_sweep, "sample_class_balanced", recording_sampler)
    pipe = ClassConditionalPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    args = guidance_sweep.parse_args([str(pipeline_dir), "--schedulers", "ddim", "--num_inference_steps", "2",
                                      "--samples_per_class", "1", "--seeds", "0", "--clip_sample", choice])  # fmt: skip
    reference = guidance_sweep.RealReference(np.random.default_rng(0).normal(size=(50, 128)))
    classes = guidance_sweep.resolve_schedulers(args.schedulers)
    guidance_sweep.run_sweep(pipe, quick_classifier[0], reference, args, [3.0], classes)
    assert received == [expected]


def test_clip_sample_changes_samples(pipeline_dir):
    pipe = ClassConditionalPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    clipped, _ = sample_class_balanced(pipe, 1, 3.0, 3, clip_sample=True)
    unclipped, _ = sample_class_balanced(pipe, 1, 3.0, 3, clip_sample=False)
    assert not torch.equal(clipped, unclipped), "clip_sample must reach the pipeline call"


def test_failed_run_is_recorded(pipeline_dir, quick_classifier, monkeypatch):
    def sampler_failing_at_scale_3(pipe, samples_per_class, guidance_scale, *args, **kwargs):
        if guidance_scale == 3.0:
            raise FloatingPointError("sampling produced non-finite values")
        return sample_class_balanced(pipe, samples_per_class, guidance_scale, *args, **kwargs)

    monkeypatch.setattr(guidance_sweep, "sample_class_balanced", sampler_failing_at_scale_3)
    pipe = ClassConditionalPipeline.from_pretrained(pipeline_dir)
    pipe.set_progress_bar_config(disable=True)
    args = guidance_sweep.parse_args([str(pipeline_dir), "--schedulers", "ddim", "--num_inference_steps", "2",
                                      "--samples_per_class", "1", "--seeds", "0"])  # fmt: skip
    reference = guidance_sweep.RealReference(np.random.default_rng(0).normal(size=(50, 128)))
    classes = guidance_sweep.resolve_schedulers(args.schedulers)
    rows, grids = guidance_sweep.run_sweep(pipe, quick_classifier[0], reference, args, [1.0, 3.0], classes)

    succeeded, failed = rows
    assert succeeded["error"] == ""
    assert math.isfinite(succeeded["classifier_fid"])
    assert "non-finite" in failed["error"]
    assert math.isnan(failed["classifier_fid"])
    assert math.isnan(failed["class_accuracy_0"])
    assert len(grids[1.0]) == 1
    assert grids[3.0] == [], "a failed run has no grid"
    best = guidance_sweep.best_setting(guidance_sweep.aggregate_runs(rows), "classifier_fid", higher_is_better=False)
    assert best["guidance_scale"] == 1.0


def test_summary_csv_matches_per_seed_rows(sweep_run):
    runs = read_csv(sweep_run["output_dir"] / "sweep.csv")
    summary = read_csv(sweep_run["output_dir"] / "sweep_summary.csv")
    assert len(summary) == len(SCHEDULERS) * len(STEPS) * len(WEIGHTS)

    for row in summary:
        key = (row["scheduler"], row["num_inference_steps"], row["guidance_scale"])
        group = [run for run in runs if (run["scheduler"], run["num_inference_steps"], run["guidance_scale"]) == key]
        assert int(row["num_seeds"]) == len(SEEDS) == len(group)
        assert float(row["guidance_weight"]) == float(row["guidance_scale"]) - 1
        for metric in ("class_accuracy", "classifier_fid", "precision", "recall", "class_accuracy_9"):
            values = [float(run[metric]) for run in group]
            assert float(row[f"{metric}_mean"]) == pytest.approx(np.mean(values)), (key, metric)
            assert float(row[f"{metric}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12), (key, metric)


def test_markdown_report_is_complete(sweep_run, quick_classifier):
    text = (sweep_run["output_dir"] / "sweep.md").read_text()
    header, rows = markdown_rows(text, "## Metrics")
    assert header[:4] == ["scheduler", "steps", "s", "w"]
    assert len(rows) == len(SCHEDULERS) * len(STEPS) * len(WEIGHTS)
    for cells in rows:
        assert len(cells) == len(header)
        assert float(cells[3]) == float(cells[2]) - 1
        for cell in cells[4:8]:
            assert "±" in cell, cells
            assert "nan" not in cell.lower(), cells
        assert cells[8] == f"{len(SEEDS)} × {SAMPLES_PER_CLASS * NUM_CLASSES}"

    header, rows = markdown_rows(text, "## Class accuracy per class")
    assert header == ["scheduler", "steps", "s", "w", *(str(class_id) for class_id in range(NUM_CLASSES))]
    assert len(rows) == len(SCHEDULERS) * len(STEPS) * len(WEIGHTS)
    assert all(cell.endswith("%") for cells in rows for cell in cells[4:])

    ceiling = quick_classifier[1]["test_accuracy"]
    assert f"{100 * ceiling:.1f}%" in text
    assert "not comparable with Inception FID" in text


def test_recommendation_matches_summary_csv(sweep_run):
    report = sweep_run["report"]
    assert json.loads((sweep_run["output_dir"] / "sweep.json").read_text()) == report
    reference = report["reference_setting"]
    assert reference == {"scheduler": SCHEDULERS[0], "num_inference_steps": STEPS[0]}

    rows = [row for row in read_csv(sweep_run["output_dir"] / "sweep_summary.csv")
            if row["scheduler"] == SCHEDULERS[0] and int(row["num_inference_steps"]) == STEPS[0]]  # fmt: skip
    swept = sorted(weight + 1 for weight in WEIGHTS)
    best_fid = min(rows, key=lambda row: (float(row["classifier_fid_mean"]), float(row["guidance_scale"])))
    best_accuracy = min(rows, key=lambda row: (-float(row["class_accuracy_mean"]), float(row["guidance_scale"])))
    assert report["best_fid"]["guidance_scale"] in swept
    assert report["best_fid"]["guidance_scale"] == float(best_fid["guidance_scale"])
    assert report["best_fid"]["guidance_weight"] == report["best_fid"]["guidance_scale"] - 1
    assert report["best_fid"]["classifier_fid_mean"] == pytest.approx(float(best_fid["classifier_fid_mean"]))
    assert report["best_accuracy"]["guidance_scale"] == float(best_accuracy["guidance_scale"])
    assert len(report["best_by_setting"]) == len(SCHEDULERS) * len(STEPS)
    assert report["default_guidance_scale"] is None


def test_sweep_without_set_default_keeps_model_index(sweep_run):
    assert sweep_run["index_after"] == sweep_run["index_before"]


def run_set_default_sweep(folder, choice: str, classifier, cache_dir):
    """Sweep `folder` with DDIM at 2 steps and `--set_default choice`; return sweep.json's content and the output."""
    argv = [
        str(folder),
        "--guidance_weights", *map(str, WEIGHTS),
        "--schedulers", "ddim",
        "--num_inference_steps", "2",
        "--samples_per_class", str(SAMPLES_PER_CLASS),
        "--seeds", *map(str, SEEDS),
        "--set_default", choice,
    ]  # fmt: skip
    return run_sweep_command(argv, classifier, cache_dir)


def test_set_default_writes_chosen_scale(pipeline_dir, quick_classifier, tmp_path, caplog):
    folder = tmp_path / "cfg-digits"
    shutil.copytree(pipeline_dir, folder)
    caplog.set_level(logging.WARNING, logger=guidance_sweep.logger.name)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights_before = weights.stat().st_mtime_ns
    files_before = sorted(path.name for path in folder.iterdir())
    report, printed = run_set_default_sweep(folder, "fid", quick_classifier, tmp_path / "cache")

    chosen = report["best_fid"]["guidance_scale"]
    assert chosen in [weight + 1 for weight in WEIGHTS]
    assert report["default_guidance_scale"] == {
        "source": "fid",
        "previous": SAVED_DEFAULT_SCALE,
        "new": chosen,
        "model_card": None,
    }
    index = json.loads((folder / "model_index.json").read_text())
    assert index["default_guidance_scale"] == chosen
    assert index["_class_name"] == ["pipeline_class_conditional", "ClassConditionalPipeline"], "remote code entry lost"
    assert ClassConditionalPipeline.from_pretrained(folder).config.default_guidance_scale == chosen
    assert weights.stat().st_mtime_ns == weights_before, "--set_default rewrote the UNet weights"
    assert sorted(path.name for path in folder.iterdir()) == sorted([*files_before, "guidance_sweep"])
    for name in ("training_config.json", "README.md", "guidance_sweep/sweep.csv", "guidance_sweep/sweep.md"):
        assert (folder / name).is_file(), f"{name} is missing after --set_default"
    assert "from 4 to" in printed
    assert "default_guidance_scale" in (folder / "guidance_sweep" / "sweep.md").read_text()
    # Training did not write this card (the folder has no eval_results.json), so it stays, with a warning.
    assert (folder / "README.md").read_text() == "model card\n"
    assert "update its recommended scale to s = " in caplog.text
    assert "Wrote the model card" not in printed


def recommended_scale(card: str) -> float:
    match = re.search(r"\*\*Recommended guidance scale: s = ([-0-9.e]+) \(w = ", card)
    assert match, "the card states no recommended guidance scale"
    return float(match.group(1))


def card_section(card: str, title: str) -> str:
    start = card.index(f"\n## {title}\n")
    end = card.find("\n## ", start + 1)
    return card[start:] if end == -1 else card[start:end]


def test_set_default_updates_training_card(quick_classifier, tmp_path):
    folder = tmp_path / "cfg-digits"
    run_main(tiny_argv(folder, "--max_train_steps", 2, "--checkpointing_steps", 100,
                       "--guidance_scale", SAVED_DEFAULT_SCALE))  # fmt: skip
    card_before = (folder / "README.md").read_text()
    assert recommended_scale(card_before) == SAVED_DEFAULT_SCALE

    report, printed = run_set_default_sweep(folder, "accuracy", quick_classifier, tmp_path / "cache")

    chosen = report["best_accuracy"]["guidance_scale"]
    assert chosen != SAVED_DEFAULT_SCALE
    assert ClassConditionalPipeline.from_pretrained(folder).config.default_guidance_scale == chosen
    card = (folder / "README.md").read_text()
    assert recommended_scale(card) == chosen
    assert f"guidance_scale={chosen:g}," in card, "the usage example still shows the old scale"
    assert f"guidance_scale={SAVED_DEFAULT_SCALE:g}" not in card
    recommended_rows = [line for line in card.splitlines() if "(recommended)" in line]
    assert len(recommended_rows) == 1
    assert recommended_rows[0].startswith(f"| {chosen:g} | {chosen - 1:g} |")
    assert "Chosen by diffusers-cfg-sweep as the scale with the best class accuracy among s = 1, 3" in card
    assert "set by --guidance_scale at training time" not in card
    assert card_section(card, "Training") == card_section(card_before, "Training")
    assert card_section(card, "Classes") == card_section(card_before, "Classes")
    assert report["default_guidance_scale"]["model_card"] == str(folder / "README.md")
    assert f"Wrote the model card {folder / 'README.md'} again with s = {chosen:g}" in printed


def test_missing_cuda_fails_before_loading(pipeline_dir, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has cuda")
    monkeypatch.setattr(guidance_sweep, "load_labeled_images", lambda name: pytest.fail("data loaded before the check"))
    with pytest.raises(SystemExit, match="--device 'cuda' is not available on this machine"):
        guidance_sweep.main([str(pipeline_dir), "--output_dir", str(tmp_path / "sweep"), "--device", "cuda"])


@pytest.mark.parametrize("layout", ["output_dir is a file", "parent is a file"])
def test_output_dir_that_is_a_file(pipeline_dir, tmp_path, monkeypatch, layout):
    monkeypatch.setattr(guidance_sweep, "load_labeled_images", lambda name: pytest.fail("data loaded before the check"))
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    if layout == "output_dir is a file":
        output_dir, expected = blocker, f"--output_dir '{blocker}' is a file; give a folder"
    else:
        output_dir, expected = blocker / "sweep", f"--output_dir '{blocker / 'sweep'}' cannot be created, because"
    with pytest.raises(SystemExit) as exit_info:
        guidance_sweep.main([str(pipeline_dir), "--output_dir", str(output_dir)])
    assert str(exit_info.value).startswith(f"error: {expected}")


def test_set_default_failure_keeps_reports(pipeline_dir, quick_classifier, tmp_path, monkeypatch):
    folder = tmp_path / "cfg-digits"
    shutil.copytree(pipeline_dir, folder)
    index_before = (folder / "model_index.json").read_bytes()

    def failing_write(pipeline_dir, guidance_scale):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(guidance_sweep, "set_default_guidance_scale", failing_write)
    with pytest.raises(SystemExit) as exit_info:
        run_set_default_sweep(folder, "fid", quick_classifier, tmp_path / "cache")

    message = str(exit_info.value)
    assert "--set_default fid: writing model_index.json" in message
    assert "No space left on device" in message
    assert f"the reports are in {folder / 'guidance_sweep'}" in message
    for name in ("sweep.csv", "sweep_summary.csv", "sweep.md", "sweep.png", "sweep.json"):
        assert (folder / "guidance_sweep" / name).is_file(), f"{name} was lost with the failed --set_default"
    report = json.loads((folder / "guidance_sweep" / "sweep.json").read_text())
    assert report["default_guidance_scale"] is None, "sweep.json claims a change that did not happen"
    assert (folder / "model_index.json").read_bytes() == index_before


def test_set_default_rewrites_index_atomically(tmp_path):
    pipe_dir = tmp_path / "pipe"
    pipe_dir.mkdir()
    index = {"_class_name": ["pipeline_class_conditional", "ClassConditionalPipeline"], "_diffusers_version": "0.35.0",
             "default_guidance_scale": 4.0, "id2label": {"0": "a"}, "unet": ["diffusers", "UNet2DModel"]}  # fmt: skip
    (pipe_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (pipe_dir / "model_index.json").chmod(0o644)

    previous = guidance_sweep.set_default_guidance_scale(str(pipe_dir), 2.5)

    assert previous == 4.0
    assert json.loads((pipe_dir / "model_index.json").read_text()) == {**index, "default_guidance_scale": 2.5}
    assert (pipe_dir / "model_index.json").stat().st_mode & 0o777 == 0o644
    assert [path.name for path in pipe_dir.iterdir()] == ["model_index.json"], "a temporary file was left behind"


@pytest.mark.parametrize(
    ("clip_sample", "scheduler_clips", "expected"),
    [
        ("on", False, ("Clipping of the x_0 estimate was on in the sweep (--clip_sample on), but the pipeline "
                       "samples without clipping by default: pass clip_sample=True")),
        ("off", True, ("was off in the sweep (--clip_sample off), but the pipeline samples with clipping by default: "
                       "pass clip_sample=False")),
        ("auto", False, None),
        ("on", True, None),
        ("off", False, None),
    ],
)  # fmt: skip
def test_recommendation_source_states_clipping(clip_sample, scheduler_clips, expected):
    choice = {"num_samples": 30, "num_seeds": 2}
    source = guidance_sweep.recommendation_source(
        "fid", choice, {"scheduler": "ddim", "num_inference_steps": 2}, [1.0, 3.0], clip_sample, scheduler_clips
    )
    assert source.startswith("Chosen by diffusers-cfg-sweep as the scale with the best classifier FID among s = 1, 3")
    if expected is None:
        assert "clip" not in source.lower()
    else:
        assert expected in source


def test_console_command_exits_zero_quietly(pipeline_dir, quick_classifier, tmp_path):
    """Run main() as the installed wrapper does, with the quick classifier in the cache that the sweep reads."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    data = load_labeled_images("builtin:digits")
    key = classifier_module._cache_key(data, 8, 1)
    model, info = quick_classifier
    save_file(model.state_dict(), str(cache_dir / f"classifier-{key}.safetensors"))
    (cache_dir / f"classifier-{key}.json").write_text(json.dumps(info))
    output_dir = tmp_path / "sweep"
    argv = [str(pipeline_dir), "--guidance_weights", "0", "--schedulers", "ddim", "--num_inference_steps", "2",
            "--samples_per_class", "1", "--seeds", "0", "--output_dir", str(output_dir)]  # fmt: skip
    # The httpx2 record stands for the HTTP clients, which log every request at INFO.
    code = (
        "import logging, sys\n"
        "from diffusers_cfg.training.guidance_sweep import main\n"
        f"status = main({argv!r})\n"
        "logging.getLogger('httpx2').info('HTTP Request: GET http://127.0.0.1/probe')\n"
        "sys.exit(status)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            env=script_env(DIFFUSERS_CFG_CACHE=str(cache_dir)))  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert printed_values(result.stderr) == [], "the return value of main() reached stderr"
    assert "HTTP Request" not in result.stderr, "INFO records of other libraries reach the console"
    assert "Sweeping 1 scales" in result.stderr, "the progress line is missing"
    assert "Training the evaluation classifier" not in result.stderr, "the cached classifier was not used"
    assert (output_dir / "sweep.json").is_file()
