"""Using trained models: finding and loading them, adapting and predicting, evaluating,
comparing them, and starting a sweep from one.

- ``inference``: a model URI resolved in the tracking store, loaded, evaluated on an import's
  episodes (``orch predict``, ``orch evaluate``, the served model's answers);
- ``compare``: ``orch compare``'s paired comparison (settings, scoring, cache, report);
- ``pretrained``: ``model.init`` found and checked against a sweep before anything is written.

May import: ``orchestrator.config``, ``orchestrator.errors``, ``orchestrator.plots``,
``orchestrator.training`` and ``orchestrator.services``; never the sweep or the command line.
"""
