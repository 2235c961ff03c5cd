"""The adapters to the outside systems orch drives: each system is touched from one module.

- ``tracking``: MLflow (runs, metrics, models, the registry, the served pyfunc model);
- ``study``: Optuna (studies, samplers, pruners, the storage, optuna-dashboard);
- ``cluster``: Ray (connecting, placement groups, trial tasks, shard actors); ``addresses``
  reads cluster addresses before Ray is imported;
- ``retry``: waiting out a store that blinks (bounded backoff, a trial's outbox), used by the
  three store adapters, each saying which of its errors are transient;
- ``champion``: the policy the registry applies to the champion alias;
- ``processes``: processes of this machine by pid and start time.

May import: ``orchestrator.config``, ``orchestrator.errors``, ``orchestrator.plots`` and
``orchestrator.training`` (the Ray actors run its shard workers; the pyfunc model serves its
trained models); never the sweep, the model commands or the command line.
"""
