"""``orch predict`` and ``orch evaluate``: use a trained model on new classes.

    orch predict --model models:/orch-protonet@champion --support support/ --query query/
    orch predict --model models:/orch-maml/2 --support support/ --query query/ --steps 5 --format csv
    orch predict --model models:/orch-alpaca@champion --support support.csv --query query.csv
    orch evaluate --model models:/orch-protonet@champion --data data/omniglot --split test \\
        --ways 5 --shots 1 --tasks 600
    orch evaluate --model models:/orch-protonet@champion --data s3://bucket/cub --convert
    orch evaluate --model models:/orch-simpleshot@champion --transductive laplacianshot
    orch evaluate --model models:/orch-protonet@champion --episodes variable

SUPPORT holds one sub-folder per class (its name is the class) with a few PNG/JPEG images of any
size; QUERY holds the images to classify. Images get the preprocessing recorded when the model's
training data was imported. A regression model takes CSV files instead (support rows: inputs
then targets; query rows: inputs) and prints predicted values, with a ``std`` column when its
predictions carry uncertainty (ALPaCA). ``evaluate`` prints the mean accuracy (MSE for
regression; plus query log-likelihood and 95%-interval coverage with uncertainty) with its 95%
interval and records them as tags on the registered model version. ``--data`` may name another
import than the model's own (cross-domain: an Omniglot model on CUB); one whose images have
another size or channel count is refused unless ``--convert`` gives them the model's treatment.
``--transductive`` classifies each task's queries together (learners/transduction.py);
``--episodes variable`` scores Meta-Dataset-style episodes (pipelines/variable_episodes.py).
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

from orchestrator.models.inference import DEFAULT_TRACKING_URI

_model = click.option("--model", "model_uri", required=True, metavar="URI",
                      help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a "
                           "model folder.")
_tracking = click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                         default=DEFAULT_TRACKING_URI, show_default=True,
                         help="MLflow tracking URI (or MLFLOW_TRACKING_URI).")
_steps = click.option("--steps", type=click.IntRange(0, 1000), default=None,
                      help="Inner gradient steps on the support set (default: as trained); "
                           "ignored by learners without an inner loop (ProtoNet).")
_transductive = click.option(
    "--transductive", default=None, metavar="METHOD[:KNOB=VALUE,...]",
    help="Classify the queries together, transductively: tim, bdcspn, laplacianshot or ptmap, "
         "with the papers' knobs or METHOD:KNOB=VALUE,... (e.g. laplacianshot:lam=0.7); none: "
         "one at a time. Default: the method the model was validated with, else none. For "
         "learners with embeddings (protonet, metaoptnet, baseline, baselinepp, simpleshot); "
         "see docs/transductive.md.")


def _with_transduction(model, text: str | None):
    """``model`` classifying queries as ``--transductive`` says (unchanged without it)."""
    from learners.transduction import Transduction

    return model if text is None else model.with_transduction(Transduction.parse(text))


@click.command()
@_model
@click.option("--support", required=True, type=click.Path(path_type=Path),
              help="Folder with one sub-folder of images per class; for a regression model, a "
                   "CSV file whose rows are the input values, then the target values.")
@click.option("--query", required=True, type=click.Path(path_type=Path),
              help="Folder of images to classify; for a regression model, a CSV file of input "
                   "rows.")
@click.option("--format", "output", type=click.Choice(["table", "json", "csv"]), default="table",
              show_default=True, help="How to print the predictions.")
@_steps
@_transductive
@_tracking
def predict(model_uri: str, support: Path, query: Path, output: str, steps: int | None,
            transductive: str | None, tracking_uri: str) -> None:
    """Adapt a model on the --support folder and classify every image of the --query folder:
    prints each file's name, predicted class and the score (probability) of every class.

    The queries are classified together, as in training: Conv-4's BatchNorm normalises with the
    batch's own statistics, so give it a batch of queries (a few per class), not a single image.
    A transductive method (--transductive, or the one the model was validated with) goes
    further: it uses the whole query set to place each query, so give every query of the task
    in one call; a single query is refused.

    A regression model reads CSV files of numbers instead and prints each query's inputs and
    predicted values, and a std column (the predictive standard deviation) for models whose
    predictions carry one (ALPaCA).
    """
    from orchestrator.models.inference import load, predict_folders, predict_rows, resolve

    with _one_line_errors():
        model = load(resolve(model_uri, tracking_uri=tracking_uri))
        if transductive is not None and not model.classification:
            raise click.ClickException("--transductive is for classification; this model does "
                                       "regression")
        model = _with_transduction(model, transductive)
        if not model.classification:
            inputs, values = predict_rows(model, support, query, steps=steps)
            _print_values(model_uri, inputs, values, output)
            return
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


def _print_values(model_uri: str, inputs: list[list[float]], prediction, output: str) -> None:
    """A regression model's predictions: one row per query with its inputs, predicted values and,
    when the model has uncertainty, their standard deviations."""
    groups = {"input": inputs, "prediction": prediction.outputs.tolist()}
    if prediction.std is not None:
        groups["std"] = prediction.std.tolist()
    if output == "json":
        click.echo(json.dumps([dict(zip(groups, row)) for row in zip(*groups.values())], indent=1))
        return
    columns = [name if len(values[0]) == 1 else f"{name}{i}"
               for name, values in groups.items() for i in range(len(values[0]))]
    rows = [[value for group in row for value in group] for row in zip(*groups.values())]
    if output == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([f"{value:.6g}" for value in row])
        return
    table = Table(title=f"{model_uri}: {len(rows)} queries")
    for column in columns:
        table.add_column(column, no_wrap=True, justify="right")
    for row in rows:
        table.add_row(*(f"{value:.4g}" for value in row))
    Console(width=max(80, 12 * len(columns))).print(table)


@click.command()
@_model
@click.option("--data", default=None, metavar="PATH|URI",
              help="Image import to draw episodes from: a folder or a pyarrow.fs URI (s3://, "
                   "gs://, hdfs://, file://); default: the one the model was trained on. Not "
                   "used for regression models.")
@click.option("--convert", is_flag=True,
              help="Give --data's images the model's treatment where it differs (resize with "
                   "the model's resampling, grey <-> RGB, its inversion and normalisation) "
                   "instead of refusing an import of another image size or channel count.")
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
@click.option("--episodes", type=click.Choice(["fixed", "variable"]), default=None,
              help="fixed: N-way K-shot episodes (--ways, --shots, --queries); variable: "
                   "Meta-Dataset's, 5 to 50 ways and imbalanced shots drawn per episode. "
                   "Default: as the model was trained.")
@_steps
@_transductive
@_tracking
def evaluate(model_uri: str, data: str | None, convert: bool, split: str, ways: int | None,
             shots: int | None, queries: int | None, tasks: int, seed: int,
             episodes: str | None, steps: int | None, transductive: str | None,
             tracking_uri: str) -> None:
    """Mean accuracy (MSE for regression) of a model over new episodes, with a 95% interval
    (1.96 sigma / sqrt(tasks)); recorded as tags on the registered model version. Regression
    models with predictive uncertainty (ALPaCA) also get the queries' mean log-likelihood and the
    fraction of query targets inside their 95% predictive intervals. A model trained on several
    imports is scored on each in turn, and each one's accuracy and interval is printed with
    their average, as Meta-Dataset's tables report them."""
    from orchestrator.models.inference import (evaluate as run_evaluation, evaluation_family, load,
                                        record_evaluation, resolve)

    console = Console(stderr=True)
    with _one_line_errors(), _single_thread():
        source = resolve(model_uri, tracking_uri=tracking_uri)
        model = load(source)
        if transductive is not None and not model.classification:
            raise click.ClickException("--transductive is for classification; this model does "
                                       "regression")
        model = _with_transduction(model, transductive)
        family = evaluation_family(model, data=data, ways=ways, shots=shots, queries=queries,
                                   convert=convert, episodes=episodes)
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
    origin = "" if result.data is None else f" of {result.data}" + (
        f" (converted to {'x'.join(map(str, family.input_shape()))})" if result.converted else "")
    click.echo(f"{model_uri} on {split}{origin}, {result.setting}, {len(result.per_task)} tasks: "
               f"{what} {value} (95% interval)")
    if model.transduction is not None:
        click.echo(f"queries classified together by {model.transduction.title} "
                   f"({model.transduction.describe()})")
    for name, mean, interval, count in result.per_source():
        click.echo(f"  {name}: {100 * mean:.2f}% +- {100 * interval:.2f}% ({count} tasks)")
    if result.source_average is not None:
        click.echo(f"  average over {len(result.per_source())} sources: "
                   f"{100 * result.source_average:.2f}%")
    scores = result.uncertainty_means()
    if scores:
        likelihood, likelihood_ci = scores["log_likelihood"]
        coverage, coverage_ci = scores["coverage95"]
        click.echo(f"query log-likelihood {likelihood:.4f} +- {likelihood_ci:.4f}; 95% "
                   f"predictive interval holds {100 * coverage:.2f}% +- {100 * coverage_ci:.2f}% "
                   "of query targets")
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
    from orchestrator.errors import UserError, first_line
    from pipelines.dataset import DatasetError

    # MLflow's artifact downloads draw a tqdm bar on stderr; our own output is the report.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        yield
    except (UserError, DatasetError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    except ValueError as error:  # a support set the model cannot take (e.g. too many classes)
        raise click.ClickException(first_line(error)) from None
