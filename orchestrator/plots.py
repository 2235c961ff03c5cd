"""Pictures of a sweep, logged as MLflow artifacts: a trial's learning curves, a study's
optimisation history and parameter importances (PNG for a glance, HTML to explore)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: trials run on headless nodes

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import optuna.visualization.matplotlib  # noqa: E402


def learning_curves(train: Sequence[tuple[int, float]], validation: Sequence[tuple[int, float]],
                    metric: str, title: str, path: Path) -> Path:
    """Meta-train loss and the validation metric against meta-iteration, one PNG."""
    figure, left = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        left.plot(*zip(*train), color="tab:blue", alpha=0.8, label="meta-train loss")
    left.set_xlabel("meta-iteration")
    left.set_ylabel("meta-train loss (query, before outer step)", color="tab:blue")
    right = left.twinx()
    if validation:
        right.plot(*zip(*validation), color="tab:red", marker="o", label=metric)
    right.set_ylabel(f"validation {metric}", color="tab:red")
    left.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def study_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimisation history and parameter importances, each as PNG and HTML; importances are
    skipped while fewer than two complete trials vary a parameter."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    makers = {"optimization_history": (optuna.visualization.plot_optimization_history,
                                       optuna.visualization.matplotlib.plot_optimization_history),
              "param_importances": (optuna.visualization.plot_param_importances,
                                    optuna.visualization.matplotlib.plot_param_importances)}
    for name, (interactive, static) in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
            try:
                interactive(study).write_html(folder / f"{name}.html", include_plotlyjs="cdn")
                axes = static(study)
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # not enough complete trials, or no parameter varies
        path = folder / f"{name}.png"
        axes.figure.tight_layout()
        axes.figure.savefig(path, dpi=100)
        plt.close(axes.figure)
        written += [folder / f"{name}.html", path]
    return written
