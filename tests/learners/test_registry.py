"""The registry groups learners by the family each class declares (it refuses a class declaring
none of ``FAMILIES`` at import), and the README's algorithm table (section "Algorithms") lists
every learner under the heading of that family."""

from __future__ import annotations

import re
from pathlib import Path

from learners.base import FAMILIES
from learners.registry import LEARNERS

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_families() -> dict[str, str]:
    """Learner name -> the family of the heading row it sits under in the README's table: a
    heading row (``| **gradient-based** (...) | | |``) names the family its text begins with."""
    section = README.read_text().split("\n## Algorithms\n", 1)[1].split("\n## ", 1)[0]
    found, family = {}, None
    for row in section.splitlines():
        heading = re.match(r"\| \*\*(.+?)\*\*", row)
        if heading:
            family = next((f for f in FAMILIES if heading[1].startswith(f)), heading[1])
        learner = re.match(r"\| `(\w+)` \|", row)
        if learner:
            found[learner[1]] = family
    return found


def test_learners_are_grouped_by_family_in_the_families_order():
    ranks = [FAMILIES.index(cls.family) for cls in LEARNERS.values()]
    assert ranks == sorted(ranks) and set(ranks) == set(range(len(FAMILIES)))


def test_the_readme_table_gives_each_learner_its_family():
    assert readme_families() == {name: cls.family for name, cls in LEARNERS.items()}
