"""First-order MAML (Finn et al., 2017, section 5.2): MAML with the inner gradients treated as
constants, so the outer gradient is the query gradient at the adapted weights. Cheaper in memory
and time, usually close in accuracy."""

from __future__ import annotations

from learners.maml import MAML


class FOMAML(MAML):
    """MAML without second-order terms."""

    name = "fomaml"
    first_order = True
    inner_checkpointing_refusal = ("is first order: its inner loop keeps no activations for the "
                                   "outer backward")
