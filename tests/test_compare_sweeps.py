"""Tests of diffusers-cfg-compare-sweeps on sweep folders written with the sweep's own writers."""

import json

import pytest
from command_helpers import printed_values, run_console_script
from diffusers_cfg.training import compare_sweeps, guidance_sweep
from PIL import Image


def write_sweep(folder, accuracies, dataset="builtin:mnist-5k", num_samples=20, scheduler="ddim"):
    """Write sweep_summary.csv and sweep.json for two seeds per scale, with the given mean accuracy per w."""
    rows = []
    for weight, accuracy in accuracies.items():
        for seed, offset in ((0, -0.05), (1, 0.05)):
            rows.append({"scheduler": scheduler, "scheduler_class": "DDIMScheduler", "num_inference_steps": 50,
                         "guidance_scale": weight + 1.0, "guidance_weight": weight, "seed": seed,
                         "num_samples": num_samples, "error": "", "class_accuracy": accuracy + offset,
                         "classifier_fid": 10.0 * (weight + 2), "precision": 0.8, "recall": 0.5,
                         "class_accuracy_0": accuracy + offset})  # fmt: skip
    folder.mkdir(parents=True)
    guidance_sweep.write_csv(str(folder / "sweep_summary.csv"), guidance_sweep.aggregate_runs(rows))
    report = {"dataset": dataset, "classifier": {"test_accuracy": 0.97, "test_size": 500}}
    (folder / "sweep.json").write_text(json.dumps(report))
    return folder


def test_compare_writes_plot_and_table(tmp_path):
    first = write_sweep(tmp_path / "drop05", {-1.0: 0.15, 0.0: 0.85, 3.0: 0.95})
    second = write_sweep(tmp_path / "drop20", {-1.0: 0.25, 0.0: 0.75, 3.0: 0.90})
    output = tmp_path / "comparison"
    paths = compare_sweeps.run([str(first), str(second), "--labels", "5%", "20%", "--output_dir", str(output)])

    with Image.open(paths["plot"]) as plot:
        assert plot.width > 500
    table = (output / "comparison.md").read_text()
    body = [line for line in table.splitlines() if line.startswith(("| 5%", "| 20%"))]
    assert len(body) == 6
    assert "| 5% | ddim | 50 | 4 | 3 | 95.0% ± 7.1 | 50 ± 0 | 0.800 ± 0.000 | 0.500 ± 0.000 | 2 × 20 |" in body
    assert "| 20% | ddim | 50 | 0 | -1 | 25.0% ± 7.1 | 10 ± 0 |" in body[3]
    assert "97.0%" in table


def test_compare_rejects_mixed_sample_counts(tmp_path):
    first = write_sweep(tmp_path / "a", {0.0: 0.9}, num_samples=20)
    second = write_sweep(tmp_path / "b", {0.0: 0.9}, num_samples=40)
    with pytest.raises(SystemExit, match=r"differ in samples per seed .*\[20\].*\[40\]"):
        compare_sweeps.main([str(first), str(second), "--output_dir", str(tmp_path / "out")])


def test_compare_rejects_mixed_datasets(tmp_path):
    first = write_sweep(tmp_path / "a", {0.0: 0.9})
    second = write_sweep(tmp_path / "b", {0.0: 0.9}, dataset="builtin:fashion-mnist")
    with pytest.raises(SystemExit, match="different datasets"):
        compare_sweeps.main([str(first), str(second), "--output_dir", str(tmp_path / "out")])


def test_compare_label_count_must_match(tmp_path):
    first = write_sweep(tmp_path / "a", {0.0: 0.9})
    with pytest.raises(SystemExit, match="--labels has 2 entries for 1 sweep folders"):
        compare_sweeps.main([str(first), "--labels", "x", "y", "--output_dir", str(tmp_path / "out")])


def test_compare_folder_without_summary(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="has no sweep_summary.csv"):
        compare_sweeps.main([str(tmp_path / "empty"), "--output_dir", str(tmp_path / "out")])


def test_default_labels_skip_sweep_folder_name(tmp_path):
    first = write_sweep(tmp_path / "runA" / "guidance_sweep", {0.0: 0.9})
    second = write_sweep(tmp_path / "runB" / "guidance_sweep", {0.0: 0.8})
    output = tmp_path / "out"
    compare_sweeps.run([str(first), str(second), "--output_dir", str(output)])

    table = (output / "comparison.md").read_text()
    assert f"- runA: `{first}`" in table
    assert f"- runB: `{second}`" in table


def test_default_labels_grow_until_unique(tmp_path):
    labels = compare_sweeps.default_labels([str(tmp_path / "x" / "run"), str(tmp_path / "y" / "run"),
                                            str(tmp_path / "z")])  # fmt: skip
    assert labels == ["x/run", "y/run", "z"]


def test_same_folder_twice_needs_labels(tmp_path):
    folder = write_sweep(tmp_path / "runA" / "guidance_sweep", {0.0: 0.9})
    with pytest.raises(SystemExit, match="the sweep folders have the same names .* Pass --labels"):
        compare_sweeps.run([str(folder), str(folder) + "/", "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("content", ["{}", "[]", '{"dataset": null}'])
def test_report_without_dataset(tmp_path, content):
    first = write_sweep(tmp_path / "a", {0.0: 0.9})
    second = write_sweep(tmp_path / "b", {0.0: 0.9})
    (second / "sweep.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        compare_sweeps.run([str(first), str(second), "--output_dir", str(tmp_path / "out")])
    assert str(exit_info.value) == (
        f"error: {second / 'sweep.json'} is missing the 'dataset' entry, which shows whether the sweeps share their "
        "reference data. Run diffusers-cfg-sweep again to write the file"
    )


def test_output_dir_that_is_a_file(tmp_path):
    first = write_sweep(tmp_path / "a", {0.0: 0.9})
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit, match=f"error: --output_dir '{tmp_path / 'taken'}' is a file; give a folder"):
        compare_sweeps.run([str(first), "--output_dir", str(tmp_path / "taken")])


def test_console_script_exits_zero(tmp_path):
    first = write_sweep(tmp_path / "runA" / "guidance_sweep", {0.0: 0.9, 1.0: 0.95})
    second = write_sweep(tmp_path / "runB" / "guidance_sweep", {0.0: 0.8, 1.0: 0.9})
    result = run_console_script("diffusers-cfg-compare-sweeps", [first, second, "--output_dir", tmp_path / "out"])
    assert result.returncode == 0, result.stderr
    assert printed_values(result.stderr) == [], "the return value of main() reached stderr"
    assert "Traceback" not in result.stderr
    assert f"Wrote the comparison table: {tmp_path / 'out' / 'comparison.md'}" in result.stdout
