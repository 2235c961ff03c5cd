"""``orch compare``: several trained models scored on the same episodes, as a paired comparison.

A survey table needs more than each model's mean: it needs to say whether one model is really
better than another. Scoring every model on the *same* episodes (same seed, classes, images and,
under a shift, the same distortions) makes the comparison paired: per setting, each model's
per-episode score minus the best model's has a much smaller spread than two independent means,
so its 95% interval (1.96 std / sqrt(episodes)) tells a real difference from episode noise.

Settings are every (ways, shots) pair asked for, plus a shift curve: the first (ways, shots) with
the query images distorted at each level (``pipelines.shifts``). A model that cannot serve a
setting (a fixed 5-way head asked for 20 ways, SNAIL asked for a longer support sequence than it
was built for) is marked refused in that setting, with the reason, and left out of its pairing;
models that cannot be compared at all (trained on other image sizes or channels than the data,
regression beside classification) are refused before anything is scored -- unless ``--convert``
gives the data's images each such model's own treatment (cross-domain: every model still sees
the same episodes, each converted to its input). Every row records the import its episodes came
from and whether they were converted.

A model can also be scored with its queries classified together by a transductive method
(``--transductive``, or the method it was validated with): it then takes part twice, one at a
time and transductively (``NAME +tim``), on the same episodes, so the paired difference says
what transduction gains. ``--episodes variable`` adds Meta-Dataset-style episodes
(``pipelines/variable_episodes.py``) as a setting of their own.

Beside each score, what adapting costs (``Cost``): the mean wall milliseconds to adapt to one
episode and predict its queries -- timed around that call alone, on the same episodes, in this
process's device and threads, after a warm-up episode -- the inner gradient steps adaptation takes
and the number of meta-parameters: how a practitioner chooses between a ProtoNet and a MAML.

Each (model content, setting, episodes) result is cached as JSON under the run folder, so a rerun
with one more model scores only that model; its cost was timed when it was first scored, and says
where.

Four modules, one concern each: ``settings`` (the models taking part, the settings and episodes
they are scored on, what cannot be compared), ``scoring`` (each model's score and cost per
setting, and the paired statistics of the table), ``cache`` (results already scored, by model
content, setting and episodes) and ``report`` (the table as text, Markdown, CSV, JSON and an
MLflow run). ``orch compare`` itself is ``cli.compare``.
"""
