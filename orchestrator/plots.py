"""Pictures, saved as files: a trial's learning curves and ``orch compare``'s curves (a study's
optimisation history and importances are Optuna's own plots: ``study.study_plots``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: trials run on headless nodes

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402


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


def comparison_curves(comparison, folder: Path) -> list[Path]:
    """``accuracy_vs_shots.png`` (each model's unshifted score against K, one panel per N-way;
    not for variable-way episodes alone),
    ``accuracy_vs_ms.png`` (score against milliseconds to adapt, ``cost_plot``) and, with a
    shift, ``accuracy_vs_shift.png`` (score against the shift's level at the first setting); one
    line per model with its 95% interval as a band. Regression: ``mse_vs_*``."""
    metric = "accuracy" if comparison.kind == "classification" else "mse"
    scale = 100 if metric == "accuracy" else 1
    label = "accuracy (%)" if metric == "accuracy" else "query MSE"
    models = list(dict.fromkeys(row.model for row in comparison.rows))
    colours = {model: f"C{i % 10}" for i, model in enumerate(models)}  # one colour per model
    unshifted = [s for s in comparison.settings if s.shift is None]
    plain = [s for s in unshifted if s.episodes == "fixed"]  # variable-way ones have no K
    written = []
    if plain:  # the shots curve; variable-way episodes alone have none
        ways_values = list(dict.fromkeys(s.ways for s in plain))
        figure, axes = plt.subplots(1, len(ways_values), figsize=(5 * len(ways_values), 4),
                                    dpi=100, squeeze=False)
        for panel, ways in zip(axes[0], ways_values):
            for model in models:
                points = [(r.setting.shots, r.mean * scale, r.ci95 * scale)
                          for r in comparison.rows
                          if r.model == model and r.setting.shift is None
                          and r.setting.ways == ways and r.mean is not None]
                _line_with_band(panel, points, model, colours[model])
            panel.set_xticks(sorted({s.shots for s in plain}))
            _label(panel, "shots (K)", label, f"{ways}-way" if ways else "regression")
        written.append(save_figure(figure, folder / f"{metric}_vs_shots.png"))
    written.append(cost_plot(comparison, unshifted, colours, folder / f"{metric}_vs_ms.png"))
    shifted = [s for s in comparison.settings if s.shift is not None]
    if shifted:
        first = replace(shifted[0], shift=None, level=0.0)  # its unshifted setting
        figure, panel = plt.subplots(figsize=(6, 4), dpi=100)
        for model in models:
            points = [(r.setting.level if r.setting.shift else 0.0, r.mean * scale, r.ci95 * scale)
                      for r in comparison.rows if r.model == model and r.mean is not None
                      and (r.setting.shift is not None or r.setting == first)]
            _line_with_band(panel, sorted(points), model, colours[model])
        _label(panel, f"{shifted[0].shift} level (query images only)", label, first.name)
        written.append(save_figure(figure, folder / f"{metric}_vs_shift.png"))
    return written


def cost_plot(comparison, settings: Sequence, colours: dict[str, str], path: Path) -> Path:
    """Each model's unshifted score against its milliseconds to adapt to an episode and predict
    (log scale), one panel per setting, the 95% interval of the score as a bar: what a better
    score costs."""
    metric = "accuracy" if comparison.kind == "classification" else "mse"
    scale = 100 if metric == "accuracy" else 1
    figure, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), dpi=100,
                                squeeze=False)
    for panel, setting in zip(axes[0], settings):
        for row in comparison.rows:
            if row.setting == setting and row.mean is not None and row.adapt_ms is not None:
                panel.errorbar([row.adapt_ms], [row.mean * scale], yerr=[row.ci95 * scale],
                               fmt="o", capsize=3, color=colours[row.model], label=row.model)
        panel.set_xscale("log")
        for set_formatter in (panel.xaxis.set_major_formatter, panel.xaxis.set_minor_formatter):
            set_formatter(LogFormatter(labelOnlyBase=False))  # 20, 30, 50 rather than 2x10^1
        _label(panel, "ms to adapt and predict one episode (log)",
               "accuracy (%)" if metric == "accuracy" else "query MSE", setting.name)
    return save_figure(figure, path)


def _label(panel, xlabel: str, ylabel: str, title: str) -> None:
    panel.set_xlabel(xlabel)
    panel.set_ylabel(ylabel)
    panel.set_title(title)
    panel.legend(fontsize="small")


def save_figure(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _line_with_band(axes, points: Sequence[tuple[float, float, float]], label: str,
                    colour: str) -> None:
    if not points:
        return
    x, mean, half = (list(values) for values in zip(*points))
    axes.plot(x, mean, marker="o", label=label, color=colour)
    axes.fill_between(x, [m - h for m, h in zip(mean, half)], [m + h for m, h in zip(mean, half)],
                      color=colour, alpha=0.2)
