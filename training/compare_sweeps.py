"""Put the results of several guidance sweeps side by side: one plot and one markdown table.

    diffusers-cfg-compare-sweeps sweeps/drop05 sweeps/drop10 sweeps/drop20 \\
        --labels "5% dropout" "10% dropout" "20% dropout" --output_dir sweeps/dropout

Each folder is the output of `diffusers-cfg-sweep`. The command reads its sweep_summary.csv and sweep.json and writes
comparison.png (the four metrics against w, one line per sweep and setting) and comparison.md. Classifier FID depends
on the sample count and on the reference data, so the sweeps must share the dataset and the samples per seed.
"""

import argparse
import csv
import json
import os
from pathlib import Path

from diffusers_cfg.pipelines.command_line import check_output_folder
from diffusers_cfg.training.guidance_sweep import (
    DEFAULT_OUTPUT_FOLDER,
    markdown_table,
    metrics_row_cells,
    plot_metric_lines,
)

SUMMARY_FILE = "sweep_summary.csv"
REPORT_FILE = "sweep.json"
# Summary columns that hold text. Every other column is a number.
TEXT_COLUMNS = ("scheduler", "scheduler_class")
INTEGER_COLUMNS = ("num_inference_steps", "num_seeds", "num_samples")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare the output folders of several diffusers-cfg-sweep runs in one plot and one table."
    )
    parser.add_argument("sweep_dirs", nargs="+", help="Output folders of diffusers-cfg-sweep, in legend order.")
    parser.add_argument(
        "--labels", nargs="+", default=None,
        help="Legend label of each folder, in order. Defaults to the shortest ends of the folder paths that differ, "
        f"leaving out a last {DEFAULT_OUTPUT_FOLDER!r} folder, so runA/{DEFAULT_OUTPUT_FOLDER} is labelled runA.",
    )
    parser.add_argument("--output_dir", required=True, help="Folder for comparison.png and comparison.md.")
    parser.add_argument("--title", default="Guidance sweeps compared: mean ± standard deviation over seeds",
                        help="Title of the plot and the markdown page.")  # fmt: skip
    return parser.parse_args(argv)


def read_summary(sweep_dir: str) -> list:
    """Return the rows of a sweep's sweep_summary.csv with numbers as int or float."""
    path = os.path.join(sweep_dir, SUMMARY_FILE)
    if not os.path.isfile(path):
        raise ValueError(
            f"sweep folder {sweep_dir!r} has no {SUMMARY_FILE}. Give an output folder of diffusers-cfg-sweep"
        )
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path} contains no settings")
    for row in rows:
        for column, value in row.items():
            if column in TEXT_COLUMNS:
                continue
            row[column] = int(value) if column in INTEGER_COLUMNS else float(value)
    return rows


def read_report(sweep_dir: str) -> dict:
    """Return the content of a sweep's sweep.json, which must name the dataset that the sweep was scored on."""
    path = os.path.join(sweep_dir, REPORT_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"cannot read {path} ({error.__class__.__name__}: {error}). Run diffusers-cfg-sweep again"
        ) from error
    if not isinstance(report, dict) or not isinstance(report.get("dataset"), str):
        raise ValueError(
            f"{path} is missing the 'dataset' entry, which shows whether the sweeps share their reference data. "
            "Run diffusers-cfg-sweep again to write the file"
        )
    return report


def default_labels(sweep_dirs: list) -> list:
    """Return, for every folder path, its shortest end that no other path shares, as legend labels.

    A last folder named like the sweep's default output folder is left out, because the folder above it names the
    run. Raises a ValueError when two paths end in the same names all the way up, such as one folder given twice.
    """
    parts = []
    for sweep_dir in sweep_dirs:
        names = Path(os.path.abspath(sweep_dir)).parts
        if len(names) > 2 and names[-1] == DEFAULT_OUTPUT_FOLDER:
            names = names[:-1]
        parts.append(names)
    labels = []
    for index, names in enumerate(parts):
        others = [other for position, other in enumerate(parts) if position != index]
        for length in range(1, len(names) + 1):
            if all(other[-length:] != names[-length:] for other in others):
                labels.append("/".join(names[-length:]))
                break
    if len(labels) == len(parts):
        return labels
    raise ValueError(
        f"the sweep folders have the same names ({', '.join(sweep_dirs)}), so they get the same legend label. Pass "
        "--labels with one distinct label per folder"
    )


def check_comparable(sweep_dirs: list, summaries: list, reports: list) -> None:
    """Raise a ValueError when the sweeps differ in dataset or samples per seed, which classifier FID depends on."""
    datasets = {report["dataset"] for report in reports}
    if len(datasets) > 1:
        listing = ", ".join(f"{path}: {report['dataset']}" for path, report in zip(sweep_dirs, reports))
        raise ValueError(f"the sweeps were scored on different datasets ({listing}). Compare sweeps of one dataset")
    counts = {row["num_samples"] for rows in summaries for row in rows}
    if len(counts) > 1:
        listing = ", ".join(
            f"{path}: {sorted({row['num_samples'] for row in rows})}" for path, rows in zip(sweep_dirs, summaries)
        )
        raise ValueError(
            f"the sweeps differ in samples per seed ({listing}). Classifier FID, precision and recall change with "
            "the sample count, so rerun them with the same --samples_per_class"
        )


def labelled_lines(labels: list, summaries: list) -> dict:
    """Return label -> summary rows, one entry per sweep and (scheduler, steps) setting."""
    lines = {}
    for label, rows in zip(labels, summaries):
        settings = list(dict.fromkeys((row["scheduler"], row["num_inference_steps"]) for row in rows))
        for scheduler, steps in settings:
            name = label if len(settings) == 1 else f"{label}, {scheduler} {steps} steps"
            lines[name] = [row for row in rows if (row["scheduler"], row["num_inference_steps"]) == (scheduler, steps)]
    return lines


def comparison_table(lines: dict) -> list:
    header = ["sweep", "scheduler", "steps", "s", "w", "class accuracy", "classifier FID", "precision", "recall",
              "seeds × samples"]  # fmt: skip
    cells = [[label, *metrics_row_cells(row)] for label, rows in lines.items() for row in rows]
    return markdown_table(header, cells)


def compare(args: argparse.Namespace) -> dict:
    """Write comparison.png and comparison.md and return their paths."""
    check_output_folder("--output_dir", args.output_dir)
    labels = args.labels or default_labels(args.sweep_dirs)
    if len(labels) != len(args.sweep_dirs):
        raise ValueError(f"--labels has {len(labels)} entries for {len(args.sweep_dirs)} sweep folders. Give one "
                         "label per folder")  # fmt: skip
    if len(set(labels)) != len(labels):
        raise ValueError(f"--labels repeats a label: {labels}. Each line of the plot needs its own label")
    summaries = [read_summary(path) for path in args.sweep_dirs]
    reports = [read_report(path) for path in args.sweep_dirs]
    check_comparable(args.sweep_dirs, summaries, reports)

    lines = labelled_lines(labels, summaries)
    ceiling = reports[0].get("classifier", {}).get("test_accuracy")
    os.makedirs(args.output_dir, exist_ok=True)
    paths = {"plot": os.path.join(args.output_dir, "comparison.png"),
             "table": os.path.join(args.output_dir, "comparison.md")}  # fmt: skip
    plot_metric_lines(paths["plot"], lines, ceiling, args.title)

    ceiling_text = "unknown" if ceiling is None else f"{100 * ceiling:.1f}%"
    sources = [f"- {label}: `{path}`" for label, path in zip(labels, args.sweep_dirs)]
    page = [
        f"# {args.title}",
        "",
        (
            f"Dataset `{reports[0]['dataset']}`. The classifier's accuracy on real test images, the ceiling for "
            f"class accuracy, is {ceiling_text}. Cells show the mean ± sample standard deviation over the seeds."
        ),
        "",
        *sources,
        "",
        *comparison_table(lines),
    ]
    with open(paths["table"], "w", encoding="utf-8") as handle:
        handle.write("\n".join(page) + "\n")
    return paths


def main(argv=None) -> None:
    """Run the compare command; the console script exits with status 0 when this returns."""
    run(argv)


def run(argv=None) -> dict:
    """Compare the sweeps that `argv` names, then print and return the written paths. Errors exit with one line."""
    args = parse_args(argv)
    try:
        paths = compare(args)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from error
    for name, path in paths.items():
        print(f"Wrote the comparison {name}: {path}")
    return paths


if __name__ == "__main__":
    main()
