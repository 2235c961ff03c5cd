"""orch's orchestrator: sweep config, meta-training loop, Ray, Optuna and MLflow glue, the CLI.

``load_meta_model`` is re-exported here for notebooks; it is imported on first use, so
``import orchestrator`` stays cheap (no MLflow, no torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.inference import load_meta_model

__all__ = ["load_meta_model"]


def __getattr__(name: str) -> Any:
    if name == "load_meta_model":
        from orchestrator.inference import load_meta_model

        return load_meta_model
    raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
