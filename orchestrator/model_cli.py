"""``orch predict`` and ``orch evaluate``: use a trained model on new classes.

    orch predict --model models:/orch-protonet@champion --support support/ --query query/
    orch predict --model models:/orch-maml/2 --support support/ --query query/ --steps 5 --format csv
    orch evaluate --model models:/orch-protonet@champion --data data/omniglot --split test \\
        --ways 5 --shots 1 --tasks 600

SUPPORT holds one sub-folder per class (its name is the class) with a few PNG/JPEG images of any
size; QUERY holds the images to classify. Images get the preprocessing recorded when the model's
training data was imported. ``evaluate`` prints the mean accuracy (MSE for regression) with its
95% interval and records them as tags on the registered model version.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table

from orchestrator.inference import DEFAULT_TRACKING_URI

_model = click.option("--model", "model_uri", required=True, metavar="URI",
                      help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a "
                           "model folder.")
_tracking = click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                         default=DEFAULT_TRACKING_URI, show_default=True,
                         help="MLflow tracking URI (or MLFLOW_TRACKING_URI).")
_steps = click.option("--steps", type=click.IntRange(0, 1000), default=None,
                      help="Inner gradient steps on the support set (default: as trained); "
                           "ignored by learners without an inner loop (ProtoNet).")


@click.command()
@_model
@click.option("--support", required=True, type=click.Path(path_type=Path),
              help="Folder with one sub-folder of images per class.")
@click.option("--query", required=True, type=click.Path(path_type=Path),
              help="Folder of images to classify.")
@click.option("--format", "output", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True, help="How to print the predictions.")
@_steps
@_tracking
def predict(model_uri: str, support: Path, query: Path, output: str, steps: int | None,
            tracking_uri: str) -> None:
    """Adapt a model on the --support folder and classify every image of the --query folder:
    prints each file's name, predicted class and the score (probability) of every class.

    The queries are classified together, as in training: Conv-4's BatchNorm normalises with the
    batch's own statistics, so give it a batch of queries (a few per class), not a single image.
    """
    from orchestrator.inference import load, predict_folders, resolve

    with _one_line_errors():
        model = load(resolve(model_uri, tracking_uri=tracking_uri))
        files, prediction = predict_folders(model, support, query, steps=steps)
    classes = prediction.classes or []
    scores = prediction.scores.tolist()
    rows = [(file.name, label, dict(zip(classes, row)))
            for file, label, row in zip(files, prediction.labels or [], scores)]
    if output == "json":
        click.echo(json.dumps([{"file": name, "prediction": label, "scores": by_class}
                               for name, label, by_class in rows], indent=1))
    elif output == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["file", "prediction", *classes])
        for name, label, by_class in rows:
            writer.writerow([name, label, *(f"{by_class[c]:.6f}" for c in classes)])
    else:
        table = Table(title=f"{model_uri}: {len(files)} queries, {len(classes)} classes")
        for column in ("file", "prediction", *classes):
            table.add_column(column, no_wrap=True)
        for name, label, by_class in rows:
            table.add_row(name, label, *(f"{by_class[c]:.3f}" for c in classes))
        widths = [max(len(r[0]) for r in rows), max(len(c) for c in classes)]
        widths += [max(len(c), 5) for c in classes]
        Console(width=max(80, sum(widths) + 3 * len(widths) + 1)).print(table)


@click.command()
@_model
@click.option("--data", type=click.Path(path_type=Path), default=None,
              help="Image import to draw episodes from (default: the one the model was trained "
                   "on); not used for regression models.")
@click.option("--split", default="test", show_default=True,
              help="Split of the import to evaluate on.")
@click.option("--ways", type=click.IntRange(2), default=None,
              help="N classes per episode (default: as trained).")
@click.option("--shots", type=click.IntRange(1), default=None,
              help="K support examples per class (default: as trained).")
@click.option("--queries", type=click.IntRange(1), default=None,
              help="Query examples per class (default: as trained).")
@click.option("--tasks", type=click.IntRange(1), default=600, show_default=True,
              help="Episodes to average over.")
@click.option("--seed", default=0, show_default=True, help="Seed of the episode draw.")
@_steps
@_tracking
def evaluate(model_uri: str, data: Path | None, split: str, ways: int | None, shots: int | None,
             queries: int | None, tasks: int, seed: int, steps: int | None,
             tracking_uri: str) -> None:
    """Mean accuracy (MSE for regression) of a model over new episodes, with a 95% interval
    (1.96 sigma / sqrt(tasks)); recorded as tags on the registered model version."""
    from orchestrator.inference import (evaluate as run_evaluation, evaluation_family, load,
                                        record_evaluation, resolve)

    console = Console(stderr=True)
    with _one_line_errors(), _single_thread():
        source = resolve(model_uri, tracking_uri=tracking_uri)
        model = load(source)
        family = evaluation_family(model, data=data, ways=ways, shots=shots, queries=queries)
        columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True,
                      disable=not console.is_terminal) as bar:
            task = bar.add_task(f"evaluating on {split}", total=tasks)
            result = run_evaluation(model, family, split=split, tasks=tasks, seed=seed, steps=steps,
                                    on_task=lambda done: bar.update(task, completed=done))
        recorded = record_evaluation(source, result)
    what = "accuracy" if result.metric == "accuracy" else "MSE"
    value = (f"{100 * result.mean:.2f}% +- {100 * result.ci95:.2f}%" if result.metric == "accuracy"
             else f"{result.mean:.4f} +- {result.ci95:.4f}")
    click.echo(f"{model_uri} on {split}, {result.setting}, {len(result.per_task)} tasks: "
               f"{what} {value} (95% interval)")
    if recorded:
        click.echo(f"recorded on {source.name} version {source.version}: "
                   f"{', '.join(sorted(result.tags()))}")
    else:
        console.print("not recorded: the model is not a registered model version")


@contextmanager
def _single_thread() -> Iterator[None]:
    """An episode is a few small tensors: torch's intra-op thread pool costs more than it gives
    (100 Omniglot episodes took 10x longer with 2 threads than with 1 on a busy 2-core machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """What a user can fix becomes one line and a non-zero exit."""
    from orchestrator.inference import InferenceError
    from pipelines.dataset import DatasetError

    # MLflow's artifact downloads draw a tqdm bar on stderr; our own output is the report.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        yield
    except (InferenceError, DatasetError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    except ValueError as error:  # a support set the model cannot take (e.g. too many classes)
        raise click.ClickException(str(error).strip().splitlines()[0]) from None
