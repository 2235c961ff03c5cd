"""The ``orch`` command line.

    orch launch examples/quickstart.yaml      # tune, farm, track and register
    orch runs quickstart                      # the sweep's trials, state, params and metric
    orch models                               # registered models, versions, metric, aliases
    orch dashboard quickstart                 # optuna-dashboard on the sweep's studies
    orch promote orch-maml 2                  # move the champion alias by hand
    orch predict --model models:/orch-protonet@champion --support S/ --query Q/
    orch evaluate --model models:/orch-protonet@champion --split test --ways 5 --shots 1
    orch compare --sweep omniglot --ways 5,20 --shots 1,5 --shift shear:0,0.2,0.4,0.6
    orch data import omniglot images_background.zip --out data/omniglot
    orch ui                                   # MLflow's UI on 127.0.0.1
    orch cluster up --nodes 2                 # a real 2-node Ray cluster on 127.0.0.1

Errors are printed by click as one line on stderr, ``Error: <what is wrong>``, with exit
status 1: ``OrchGroup`` turns any other exception into a ``click.ClickException``, and
``_one_line`` puts the exception's type name first unless it is one of orch's two kinds
(``errors.UserError``: input to fix; ``errors.MachineryError``: a process, cluster or store that
failed) or a ``FileNotFoundError``/``PermissionError``. ``--debug`` shows the traceback
instead. Usage mistakes are click's own: ``Error: ...`` after a usage line, exit status 2. Lines
starting ``orch:`` are notices from a running sweep (a restart, a refused checkpoint), not errors.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator.services import addresses
from orchestrator.config import DEFAULT_STORAGE, DEFAULT_TRACKING_URI, load_sweep
from orchestrator.errors import MachineryError, UserError, first_line
from orchestrator.cli.cluster import cluster
from orchestrator.cli.compare import compare
from orchestrator.cli.data import data
from orchestrator.cli.predict import evaluate, predict
from orchestrator.cli.terminal import console, output_console

class OrchGroup(click.Group):
    """Turns failures into one line and exit status 1, unless ``--debug``."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as error:  # noqa: BLE001 -- the one place errors become messages
            if ctx.obj and ctx.obj.get("debug"):
                raise
            raise click.ClickException(_one_line(error)) from None


def _one_line(error: BaseException) -> str:
    message = first_line(error)
    plain = (UserError, MachineryError, FileNotFoundError, PermissionError)
    return message if isinstance(error, plain) else f"{type(error).__name__}: {message}"


@click.group(cls=OrchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """orch: meta-learning sweeps on Ray, tuned by Optuna, tracked and registered in MLflow."""
    ctx.obj = {"debug": debug}


def json_option(function):
    return click.option("--json", "as_json", is_flag=True,
                        help="Print the rows as JSON, for scripts.")(function)


def tracking_option(function):
    return click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=DEFAULT_TRACKING_URI,
                        show_default=True, help="MLflow tracking URI (or MLFLOW_TRACKING_URI).")(function)


@cli.command()
@click.argument("sweep_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
              help="MLflow tracking URI; default: the sweep's tracking.uri, else "
                   "sqlite:///<run_dir>/mlflow.db.")
@click.option("--address", default=None,
              help="Ray cluster: auto, HOST:6379 or ray://HOST:10001; default: the sweep's "
                   "ray.address, else Ray in this process.")
@click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True),
              default=addresses.CONNECT_TIMEOUT_S, show_default=True,
              help="Seconds to join the Ray cluster before giving up.")
@click.option("--resume", is_flag=True,
              help="Continue a sweep of the same name: finished trials are kept, unfinished ones "
                   "continue from their checkpoints.")
@click.option("--quiet", is_flag=True,
              help="No progress display; the summary table, and notices (restarts, refused "
                   "checkpoints), only.")
def launch(sweep_file: Path, tracking_uri: str | None, address: str | None, connect_timeout: float,
           resume: bool, quiet: bool) -> None:
    """Run the sweep in SWEEP_FILE: one Optuna study per algorithm, trials on Ray, everything
    tracked in MLflow, the best model per algorithm registered. Trials save checkpoints; one
    whose process or node dies restarts from its last (search.restarts times). Every key of
    the sweep file, with its meaning and default: orch config."""
    sweep = load_sweep(sweep_file)
    addresses.prepare_environment(address or sweep.ray.address)  # before anything imports Ray
    from orchestrator.sweep.launch import launch as run_sweep

    try:
        with _sigterm_interrupts(), _progress_display(quiet) as progress:
            summaries = run_sweep(sweep, tracking_uri=tracking_uri, address=address, resume=resume,
                                  progress=progress, notice=_notice, source=str(sweep_file),
                                  connect_timeout=connect_timeout)
    except KeyboardInterrupt:
        raise click.ClickException(
            f"interrupted; finished trials are kept in the stores (continue with: orch launch "
            f"{sweep_file} --resume)") from None
    table = Table(title=f"sweep {sweep.name}: best trial per algorithm")
    unfinished = sum(s.counts["unfinished"] for s in summaries)
    states = "complete/pruned/failed" + ("/unfinished" if unfinished else "")
    several = len(sweep.search.objectives) > 1
    for column in ("algorithm", "best trial", sweep.search.first_objective, states, "registered",
                   "champion", *(["Pareto front (registered)"] if several else [])):
        table.add_column(column)
    for s in summaries:
        reg = s.registration
        counts = [s.counts[state] for state in states.split("/")]
        front = [f"{len(s.front)} trials: " + (", ".join(
            f"v{r.version}" for r in s.front_registrations) or "none")] if several else []
        table.add_row(s.algorithm, "-" if s.best_trial is None else str(s.best_trial),
                      "-" if s.best_value is None else f"{s.best_value:.4f}",
                      "/".join(map(str, counts)),
                      f"{reg.name} v{reg.version}" if reg else "-",
                      ("yes" if reg.champion else f"no: {reg.note}") if reg else "-", *front)
    output_console().print(table)
    uri = sweep.tracking_uri(tracking_uri)
    if unfinished:
        raise MachineryError(f"{unfinished} trial(s) could not finish because the machinery failed "
                             "them beyond search.restarts (the orch: lines above say how); they "
                             f"are kept: continue with orch launch {sweep_file} --resume")
    if not quiet:
        console.print(f"inspect: mlflow ui --backend-store-uri {uri}   (or: orch ui)")


def _notice(line: str) -> None:
    """A line the sweep wants seen (a trial restarted, a checkpoint refused), even with --quiet;
    rich prints it above the progress bars."""
    console.print(f"orch: {line}", markup=False, highlight=False)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM ends a launch as Ctrl-C does (KeyboardInterrupt): the stores stay as ``--resume``
    expects, running trials are rerun. Python's default for SIGTERM would skip that unwinding."""
    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _progress_display:
    """A rich progress bar per algorithm: trials done, running, pruned, failed, best so far."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bars: dict[str, int] = {}
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                 console=console, disable=quiet)

    def __enter__(self):
        return None if self.quiet else self.update

    def __exit__(self, *exc: Any) -> None:
        if self.bars:  # stopping a display never started prints an empty line before the error
            self.progress.stop()

    def update(self, algorithm: str, counts: dict[str, int], running: int, best: float | None,
               total: int, restarts: int = 0) -> None:
        done = sum(counts.values())
        unfinished = f"unfinished {counts['unfinished']}  " if counts.get("unfinished") else ""
        detail = (f"running {running}  pruned {counts['pruned']}  failed {counts['failed']}  "
                  f"{unfinished}restarts {restarts}  best {'-' if best is None else f'{best:.4f}'}")
        if not self.bars:
            self.progress.start()  # only once trials start: early errors stay one clean line
        if algorithm not in self.bars:
            self.bars[algorithm] = self.progress.add_task(algorithm, total=total, detail=detail)
        self.progress.update(self.bars[algorithm], completed=done, detail=detail)


@cli.command("config")
@click.option("--yaml", "as_yaml", is_flag=True,
              help="An annotated sweep file: every key at its default, its meaning as a comment.")
@click.option("--markdown", "as_markdown", is_flag=True,
              help="The table of docs/sweep-file.md.")
def config_reference(as_yaml: bool, as_markdown: bool) -> None:
    """Every key of the sweep file: what it means, what it allows and its default, read from the
    typed model that validates sweep files (so it cannot differ from what orch launch accepts)."""
    from orchestrator import config_reference as keys

    if as_yaml and as_markdown:
        raise click.UsageError("give one of --yaml and --markdown")
    if as_yaml or as_markdown:
        click.echo(keys.annotated_yaml() if as_yaml else keys.markdown(), nl=False)
        return
    table = Table(title="sweep file keys (orch config --yaml: as an annotated sweep file)")
    for column in ("key", "allowed", "default", "meaning"):
        table.add_column(column, overflow="fold")
    for key in keys.reference():
        table.add_row(key.path + (f"\n({key.variant})" if key.variant else ""), key.allowed,
                      key.default, key.meaning)
    output_console().print(table)


@cli.command()
@click.argument("sweep_name")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True, help="Optuna storage URL.")
@json_option
def runs(sweep_name: str, storage: str, as_json: bool) -> None:
    """List the trials of SWEEP_NAME: state (complete, pruned, failed, running, or interrupted:
    its orch launch is gone and --resume continues it), params, each objective's value, and
    "front" for the trials on their study's Pareto front (one objective: the best)."""
    from orchestrator.services.study import trial_rows

    from orchestrator.services.tracking import require_store

    rows = trial_rows(require_store(storage, "Optuna storage"), sweep_name)
    if not rows:
        raise click.ClickException(f"no sweep named {sweep_name!r} in {storage}")
    if as_json:
        click.echo(json.dumps(rows, indent=1, default=str))
        return
    table = Table(title=f"sweep {sweep_name}")
    for column in ("algorithm", "trial", "state", "value", "front", "params", "reason"):
        table.add_column(column)
    for row in rows:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(row["params"].items()))
        values = row["values"] or {}
        value = ("-" if not values else f"{row['value']:.4f}" if len(values) == 1 else
                 ", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))
        table.add_row(row["algorithm"], str(row["number"]), row["state"], value,
                      "front" if row["front"] else "", params, row["reason"])
    output_console().print(table)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@cli.command()
@tracking_option
@click.option("--prefix", default="", help="Only models whose name starts with this.")
@json_option
def models(tracking_uri: str, prefix: str, as_json: bool) -> None:
    """List registered models: versions, metric, aliases, and why a version is not the champion
    (scored on another metric, task or starting point, not better, or a Pareto front member)."""
    from orchestrator.services import tracking

    rows = tracking.registered_models(tracking.client(tracking.require_store(tracking_uri)), prefix)
    if as_json:
        click.echo(json.dumps([{**row, "version": int(row["version"]),
                                "value": float(row["value"]) if row["value"] else None,
                                "aliases": [a for a in row["aliases"].split(",") if a]}
                               for row in rows], indent=1))
        return
    table = Table(title=f"registered models in {tracking_uri}")
    fronts = any(row["front"] for row in rows)
    for column in ("model", "version", "metric", "value", "sweep", "aliases",
                   *(["Pareto front"] if fronts else []), "why not champion"):
        table.add_column(column)
    for row in rows:
        metric = f"{row['metric']} ({row['direction']})" if row["direction"] else row["metric"]
        front = ["yes" if row["front"] else ""] if fronts else []
        table.add_row(row["name"], str(row["version"]), metric, row["value"], row["sweep"],
                      row["aliases"], *front, row["note"])
    output_console().print(table)


@cli.command()
@click.argument("model_name")
@click.argument("version")
@tracking_option
def promote(model_name: str, version: str, tracking_uri: str) -> None:
    """Move the champion alias of MODEL_NAME to VERSION."""
    from orchestrator.services import tracking

    tracking.promote(tracking_uri, model_name, version)
    click.echo(f"{model_name}@champion -> version {version}")


@cli.command()
@tracking_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 0.0.0.0 exposes the UI to the network.")
@click.option("--port", default=5000, show_default=True)
def ui(tracking_uri: str, host: str, port: int) -> None:
    """Open MLflow's UI on the tracking store (bound to 127.0.0.1 unless told otherwise)."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri,
               "--host", host, "--port", str(port)]
    console.print(f"MLflow UI on http://{host}:{port}  (Ctrl-C to stop)")
    raise SystemExit(subprocess.call(command))


@cli.command()
@click.argument("sweep_name")
@click.option("--storage", default=DEFAULT_STORAGE, show_default=True, help="Optuna storage URL.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; 0.0.0.0 exposes the dashboard to the network.")
@click.option("--port", default=8080, show_default=True)
def dashboard(sweep_name: str, storage: str, host: str, port: int) -> None:
    """Serve optuna-dashboard on the studies of SWEEP_NAME (live while it runs; bound to
    127.0.0.1 unless told otherwise)."""
    from orchestrator.services.study import dashboard_storage, serve_dashboard

    view = dashboard_storage(storage, sweep_name)
    console.print(f"optuna-dashboard for sweep {sweep_name} on http://{host}:{port}  "
                  "(Ctrl-C to stop)")
    serve_dashboard(view, host=host, port=port)


cli.add_command(data)
cli.add_command(cluster)
cli.add_command(predict)
cli.add_command(evaluate)
cli.add_command(compare)


def main() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    exit_code: list[int] = []
    # Registered before Ray, MLflow or torch are imported, so it runs after their exit handlers
    # (Ray's shutdown, MLflow's flush): the stores are closed by then, and what it skips --
    # Python's teardown of those libraries, or of a Ray join still retrying -- takes seconds that
    # a Ctrl-C or SIGTERM should not wait for.
    atexit.register(_end_now, exit_code)
    try:
        cli(prog_name="orch")
    except SystemExit as done:
        exit_code.append(done.code if isinstance(done.code, int) else 0 if done.code is None else 1)
        raise


def _end_now(exit_code: list[int]) -> None:
    if exit_code:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code[0])


if __name__ == "__main__":
    main()
