"""``orch compare``: every model on the same episodes, with intervals, shots and shift curves.

    orch compare models:/orch-maml@champion models:/orch-protonet@champion \\
        --data data/omniglot --split test --ways 5,20 --shots 1,5 --tasks 600 \\
        --shift shear:0,0.2,0.4,0.6 --out compare/
    orch compare --sweep omniglot --shift blur:0,0.5,1 --json
    orch compare --sweep mini --data s3://bucket/cub --convert     # cross-domain
    orch compare --sweep families --transductive tim --transductive laplacianshot
    orch compare --sweep families --episodes fixed,variable        # + Meta-Dataset episodes

Writes compare.csv, compare.md and the plots into --out, logs them as one run of the MLflow
experiment ``orch-compare`` and prints the table (or, with --json, the rows as JSON).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from learners.transduction import Transduction
from orchestrator.models.inference import DEFAULT_TRACKING_URI
from orchestrator.cli.terminal import output_console


def _number_list(kind: type, least: int):
    """A click callback reading ``1,5`` into ``[1, 5]`` (each at least ``least``)."""
    def parse(ctx: click.Context, param: click.Parameter, value: str | None):
        if value is None:
            return None
        try:
            numbers = [kind(item) for item in value.split(",") if item.strip()]
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers") from None
        if not numbers or any(number < least for number in numbers):
            raise click.BadParameter(f"{value!r}: give numbers of at least {least}, e.g. 1,5")
        if len(set(numbers)) != len(numbers):
            raise click.BadParameter(f"{value!r}: a number is given twice")
        return numbers
    return parse


def _episode_kinds(text: str | None) -> set[str] | None:
    """``--episodes``: ``fixed``, ``variable`` or both, comma-separated."""
    if text is None:
        return None
    kinds = {item.strip() for item in text.split(",") if item.strip()}
    if not kinds or kinds - {"fixed", "variable"}:
        raise click.BadParameter(f"{text!r}: give fixed, variable or fixed,variable",
                                 param_hint="--episodes")
    return kinds


@click.command()
@click.argument("models", nargs=-1, metavar="[MODEL_URI]...")
@click.option("--sweep", default=None,
              help="Compare every champion registered by this sweep (with or instead of URIs).")
@click.option("--data", default=None, metavar="PATH|URI",
              help="Image import to draw episodes from: a folder or a pyarrow.fs URI (s3://, "
                   "gs://, hdfs://, file://); default: the first model's.")
@click.option("--convert", is_flag=True,
              help="Give --data's images each model's treatment where it differs (resize with "
                   "the model's resampling, grey <-> RGB, its inversion and normalisation) "
                   "instead of refusing models trained on another image size or channel count.")
@click.option("--split", default="test", show_default=True, help="Split to draw episodes from.")
@click.option("--ways", callback=_number_list(int, 2), default=None,
              help="N classes per episode, a list (e.g. 5,20); default: the first model's.")
@click.option("--shots", callback=_number_list(int, 1), default=None,
              help="K support examples per class, a list (e.g. 1,5); default: the first model's.")
@click.option("--queries", type=click.IntRange(1), default=None,
              help="Query examples per class (default 15; regression: as trained).")
@click.option("--tasks", type=click.IntRange(2), default=600, show_default=True,
              help="Episodes per setting.")
@click.option("--seed", default=0, show_default=True, help="Seed of the episode draw.")
@click.option("--shift", default=None, metavar="KIND:LEVELS",
              help="Distort the query images of the first setting at each level: shear, rotate "
                   "(degrees), blur (sigma, pixels) or noise (std on the [0, 1] pixel scale), "
                   "e.g. shear:0,0.2,0.4,0.6.")
@click.option("--steps", type=click.IntRange(0, 1000), default=None,
              help="Inner gradient steps at adaptation (default: as each model was trained).")
@click.option("--episodes", "episode_kinds", default=None, metavar="fixed|variable|fixed,variable",
              help="fixed: the --ways x --shots settings; variable: Meta-Dataset-style episodes "
                   "(5 to 50 ways, imbalanced shots) as one more setting; both: "
                   "fixed,variable. Default: as the first model was trained.")
@click.option("--transductive", "transductive", multiple=True, metavar="METHOD[:KNOB=VALUE,...]",
              help="Also score each model with its queries classified together by this "
                   "transductive method (tim, bdcspn, laplacianshot, ptmap), on the same "
                   "episodes; repeatable. A model validated with a method is scored with it "
                   "too. Models without embeddings are marked refused.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("compare"),
              show_default=True, help="Folder for compare.csv, compare.md and the plots.")
@click.option("--cache", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of cached scores (default: compare-cache in the run folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=DEFAULT_TRACKING_URI,
              show_default=True, help="MLflow tracking URI (or MLFLOW_TRACKING_URI).")
def compare(models: tuple[str, ...], sweep: str | None, data: str | None, convert: bool,
            split: str, ways: list[int] | None, shots: list[int] | None, queries: int | None, tasks: int,
            seed: int, shift: str | None, steps: int | None, episode_kinds: str | None,
            transductive: tuple[str, ...], out: Path, cache: Path | None,
            as_json: bool, tracking_uri: str) -> None:
    """Score MODEL_URIs (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or model
    folders) on the same episodes: per setting, each model's mean with its 95% interval and its
    paired difference to the best model, marked * where that difference's interval excludes zero,
    and what adapting costs: milliseconds per episode (after a warm-up one, one torch thread),
    inner gradient steps and parameters.
    """
    from orchestrator.models.compare import report, scoring, settings
    from orchestrator.cli.predict import _one_line_errors, _single_thread
    from pipelines.shifts import ShiftError, parse_shift

    console = Console(stderr=True)
    with _one_line_errors(), _single_thread():
        try:
            shift_levels = parse_shift(shift) if shift is not None else None
        except ShiftError as error:
            raise click.BadParameter(str(error), param_hint="--shift") from None
        kinds = _episode_kinds(episode_kinds)
        transductions = [Transduction.parse(text) for text in transductive]
        uris = list(models) + (settings.sweep_champions(sweep, tracking_uri) if sweep else [])
        entrants = settings.load_entrants(uris, tracking_uri=tracking_uri,
                                           transductions=[t for t in transductions if t])
        episodes = settings.check_comparable(entrants, data=data, split=split, tasks=tasks,
                                              seed=seed, queries=queries, convert=convert)
        first = entrants[0].model.spec["sweep"]["data"]
        if episodes.kind == "regression":
            for given, option in ((ways, "--ways"), (episode_kinds, "--episodes"),
                                  (transductive or None, "--transductive")):
                if given is not None:
                    raise settings.CompareError(f"{option} is for classification; these "
                                                 "models do regression")
            if shift_levels is not None:
                raise settings.CompareError("--shift distorts images; these models do "
                                             "regression")
        if kinds is None:  # as the first model was trained; --ways or --shots add fixed ones
            trained = first.get("episodes", "fixed")
            kinds = {trained} | ({"fixed"} if ways or shots or shift_levels else set())
        if "fixed" not in kinds and (ways or shots or shift_levels):
            raise settings.CompareError("--ways, --shots and --shift set fixed episodes; "
                                         "--episodes variable has none (use fixed,variable)")
        settings = settings.plan_settings(
            ways or [first.get("ways")], shots or [first.get("eval_shots") or first["shots"]],
            shift_levels, fixed="fixed" in kinds, variable="variable" in kinds)
        cache = cache or report.run_folder(tracking_uri) / "compare-cache"
        columns = (TextColumn("{task.description}"), BarColumn(),
                   TextColumn("{task.completed:.1f}/{task.total} model x setting"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True,
                      disable=not console.is_terminal) as bar:
            task = bar.add_task("scoring", total=len(entrants) * len(settings))
            comparison = scoring.run_comparison(
                entrants, settings, episodes, steps=steps, cache=cache,
                progress=lambda done, what: bar.update(task, completed=done, description=what))
        command = "orch compare " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        files = report.write_outputs(comparison, out, command)
        params = {"models": " ".join(uris), "split": split, "tasks": tasks, "seed": seed,
                  "queries": episodes.queries, "settings": ",".join(s.name for s in settings),
                  "data": episodes.data or "sampled", "steps": steps,
                  "converted": ",".join(sorted(episodes.converted)) or "none",
                  "transductive": ",".join(t.describe() for t in transductions if t) or "none"}
        run_id = report.log_to_mlflow(comparison, files, tracking_uri=tracking_uri,
                                         params=params)
    if as_json:
        click.echo(json.dumps({"kind": comparison.kind, "tasks": tasks, "split": split,
                               "data": comparison.data, "rows": comparison.records(),
                               "notes": comparison.notes,
                               "timed_on": scoring.timing_context()}, indent=1))
        return
    origin = f" of {comparison.data}" if comparison.data else ""
    table = Table(title=f"{len(entrants)} models on the same {tasks} episodes of {split}{origin}")
    for column in report.table_columns(comparison):
        table.add_column(column, no_wrap=True)
    previous = None
    for row, cells in zip(comparison.rows, report.table_cells(comparison)):
        if previous is not None and row.setting != previous:
            table.add_section()
        previous = row.setting
        table.add_row(*cells)
    output_console().print(table)
    for note in comparison.notes:
        console.print(f"note: {note}")
    console.print(f"* the paired difference's 95% interval excludes zero. Wrote "
                  f"{', '.join(p.name for p in files)} to {out}; MLflow run {run_id} in "
                  f"experiment {report.EXPERIMENT}")
