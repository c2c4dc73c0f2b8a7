"""The families and targets tests iterate over, derived from the arch tables and the tiny fixtures,
so that a new target row (plus its fixture in tests/tiny.py) is picked up with no test edit."""

from __future__ import annotations

from moekit.arch.targets import TARGETS
from tests import tiny

# Every MoE layout moekit reads (split, add-experts, prune).
READ = list(TARGETS)
# Upcycle pairs: every (dense parent, target) whose upcycle is exact.
PAIRS = [(parent, t.model_type) for t in TARGETS.values() for parent in t.parents]


def group_limited(family: str) -> bool:
    """The tiny model routes within groups of experts (split and add-experts refuse it)."""
    return tiny.MOE_FAMILIES[family].get("n_group", 1) > 1


# Layouts whose experts can be split and appended to: not group-limited.
UNGROUPED = [f for f in READ if not group_limited(f)]


def _plainest(family: str) -> tuple[bool, int]:
    return TARGETS[family].shared is not None, READ.index(family)


# One target per routing family, the plainest (no shared experts where one without exists).
PER_ROUTING = sorted({t.routing: min((f for f in UNGROUPED if TARGETS[f].routing is t.routing), key=_plainest)
                      for t in TARGETS.values()}.values(), key=READ.index)


def first_moe_layer(family: str) -> int:
    """The tiny model's first MoE layer (families with first_k_dense_replace start later)."""
    return tiny.MOE_FAMILIES[family].get("first_k_dense_replace", 0)
