"""The comparison as people and scripts read it: the table's cells (``table_cells``), Markdown,
CSV (``CSV_COLUMNS``), the files ``orch compare`` writes, and one MLflow run of the experiment
``orch-compare`` holding them."""

from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from orchestrator.config import DEFAULT_RUN_DIR
from orchestrator.models.compare.scoring import Comparison, Row


EXPERIMENT = "orch-compare"
CSV_COLUMNS = ("setting", "ways", "shots", "shift", "level", "model", "uri", "metric", "mean",
               "ci95", "tasks", "diff_to_best", "diff_ci95", "significant", "best",
               "log_likelihood", "log_likelihood_ci95", "coverage95", "adapt_ms", "inner_steps",
               "parameters", "refused", "cached", "data", "converted", "transductive")


def format_value(row: Row, percent: bool) -> str:
    if row.mean is None:
        return "refused"
    if percent:
        return f"{100 * row.mean:.2f} ± {100 * row.ci95:.2f}"
    return f"{row.mean:.4f} ± {row.ci95:.4f}"


def format_difference(row: Row, percent: bool) -> str:
    if row.mean is None:
        return "-"
    if row.best:
        return "best"
    scale, digits = (100, 2) if percent else (1, 4)
    mark = " *" if row.significant else ""
    return (f"{scale * row.diff_to_best:+.{digits}f} ± {scale * row.diff_ci95:.{digits}f}"
            f"{mark}")


def table_columns(comparison: Comparison) -> list[str]:
    percent = comparison.kind == "classification"
    columns = ["setting", "model", "accuracy (%)" if percent else "MSE",
               "vs best (paired)" + (" (points)" if percent else "")]
    if any(row.log_likelihood is not None for row in comparison.rows):
        columns += ["log-likelihood", "95% coverage"]
    return columns + ["ms/episode", "inner steps", "parameters"]


def table_cells(comparison: Comparison) -> list[list[str]]:
    """The table's rows as text: the terminal table and the Markdown file show the same."""
    percent = comparison.kind == "classification"
    uncertainty = any(row.log_likelihood is not None for row in comparison.rows)
    lines = []
    for row in comparison.rows:
        line = [row.setting.name, row.model, format_value(row, percent),
                format_difference(row, percent)]
        if uncertainty:
            line += ["-" if row.log_likelihood is None else
                     f"{row.log_likelihood:.3f} ± {row.log_likelihood_ci95:.3f}",
                     "-" if row.coverage95 is None else f"{100 * row.coverage95:.1f}%"]
        if row.adapt_ms is None:
            line += ["-", "-", "-"]
        else:
            line += [format_ms(row.adapt_ms), str(row.inner_steps), f"{row.parameters:,}"]
        lines.append(line)
    return lines


def format_ms(milliseconds: float) -> str:
    """Two decimals below 10 ms, one below 100 ms, none above: the digits timing can tell."""
    digits = 2 if milliseconds < 10 else 1 if milliseconds < 100 else 0
    return f"{milliseconds:.{digits}f}"


def markdown(comparison: Comparison, command: str | None = None) -> str:
    columns = table_columns(comparison)
    out = io.StringIO()
    if command:
        out.write(f"Made by: `{command}`\n\n")
    if comparison.data is not None:
        out.write(f"Episodes from: `{comparison.data}`\n\n")
    out.write("| " + " | ".join(columns) + " |\n")
    out.write("|" + "|".join(" --- " for _ in columns) + "|\n")
    for line in table_cells(comparison):
        out.write("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |\n")
    tasks = next((row.tasks for row in comparison.rows if row.tasks), None)
    out.write(f"\nMean over {tasks} episodes with its 95% interval (1.96 std / sqrt(episodes)); "
              "every model scored on the same episodes. \"vs best\": the mean per-episode "
              "difference to the setting's best model with its 95% interval; * where that "
              "interval excludes zero. \"ms/episode\": mean wall time to adapt to an episode's "
              "support set and predict its queries, after a warm-up episode, sampling excluded; "
              "\"inner steps\": gradient steps one adaptation takes (0: none); \"parameters\": "
              "meta-parameters.\n")
    for note in comparison.notes:
        out.write(f"\n- {note}")
    return out.getvalue().rstrip() + "\n"


def write_csv(comparison: Comparison, path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for record in comparison.records():
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
    return path


def write_outputs(comparison: Comparison, out: Path, command: str | None = None) -> list[Path]:
    """compare.csv, compare.md and the plots, written into a staging folder first and moved
    into ``out`` together: an interrupted call leaves the previous files, not half of new ones."""
    from orchestrator.plots import comparison_curves

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".compare-", dir=out))
    try:
        written = [write_csv(comparison, staging / "compare.csv")]
        (staging / "compare.md").write_text(markdown(comparison, command))
        written.append(staging / "compare.md")
        written += comparison_curves(comparison, staging)
        final = []
        for path in written:
            os.replace(path, out / path.name)
            final.append(out / path.name)
        return final
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()


def run_folder(tracking_uri: str) -> Path:
    """The run folder of a local SQLite tracking store (where its artifacts live), else orch's
    default run folder."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///")).parent
    return Path(DEFAULT_RUN_DIR)


def log_to_mlflow(comparison: Comparison, files: Sequence[Path], *, tracking_uri: str,
                  params: dict[str, Any]) -> str:
    """One run of the experiment ``orch-compare``: the call as params, each model's mean and
    ms/episode per setting as metrics, the table and plots as artifacts. Returns the run id."""
    from orchestrator.services import tracking

    metrics = {_metric_name(f"{row.metric}/{row.setting.name}/{row.model}"): row.mean
               for row in comparison.rows if row.mean is not None}
    metrics.update({_metric_name(f"adapt_ms/{row.setting.name}/{row.model}"): row.adapt_ms
                    for row in comparison.rows if row.adapt_ms is not None})
    models = ",".join(sorted({r.uri for r in comparison.rows}))
    return tracking.log_finished_run(tracking_uri, EXPERIMENT, run_folder(tracking_uri),
                                     run_name="compare", kind="compare", metrics=metrics,
                                     params=params, tags={"orch.models": models}, files=files)


def _metric_name(text: str) -> str:
    """MLflow metric names allow letters, digits and ``_ - . / space``."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in text)
