"""Running a sweep: the ``orch launch`` driver and what one trial does.

- ``launch``: every algorithm's Optuna study, trials as Ray tasks, restarts, registration;
- ``trial``: one trial, end to end, in the process that trains it;
- ``checkpoints``: a trial's loop state, saved where every node can read it;
- ``objectives``: the cost objectives a multi-objective search measures on a trained model.

May import: ``orchestrator.config``, ``orchestrator.errors``, ``orchestrator.plots``,
``orchestrator.training``, ``orchestrator.services`` and ``orchestrator.models``; never the
command line.
"""
