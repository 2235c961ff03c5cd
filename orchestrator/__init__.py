"""orch's orchestrator: everything between a sweep file and the learners, in sub-packages by role.

- ``config`` (the sweep file, one typed model; ``config_reference`` prints its keys),
  ``errors`` (the two kinds of failure) and ``plots`` (figures): shared by all;
- ``training``: meta-training and the trained model, plain PyTorch;
- ``services``: the adapters to Ray, MLflow and Optuna, and to the stores behind them;
- ``models``: using trained models (predict, evaluate, compare, start a sweep from one);
- ``sweep``: running a sweep (``orch launch``);
- ``cli``: the command line.

Each may import only what this list names before it (each sub-package's docstring says what,
tests/test_layout.py checks it). ``load_meta_model`` is re-exported here for
notebooks; it is imported on first use, so ``import orchestrator`` stays cheap (no MLflow, no
torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.models.inference import load_meta_model

__all__ = ["load_meta_model"]


def __getattr__(name: str) -> Any:
    if name == "load_meta_model":
        from orchestrator.models.inference import load_meta_model

        return load_meta_model
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
