"""Sun et al. 2024 ("Massive Activations in Large Language Models", locuslab/massive-activations):
an activation is massive when |a| > 100 and about 1000 times the median |a| of its layer's
output. Without torch: results.md and the report name the rule beside what evaluate measured."""

from __future__ import annotations

MASSIVE_ABS = 100.0
MASSIVE_RATIO = 1000.0


def massive_bar(median_abs: float) -> float:
    """The |a| an entry must exceed to be massive: both halves of the rule at once."""
    return max(MASSIVE_ABS, MASSIVE_RATIO * median_abs)


RULE_TEXT = f"|a| > {MASSIVE_ABS:g} and > {MASSIVE_RATIO:g} x the median |a| (Sun et al. 2024)"
