"""Router cost against granularity for SmolLM2-135M → 8 experts top-2 → split G ways.

Plans every split without writing it (a planned checkpoint is inspected like one on disk) and
prints a Markdown table of what `moekit inspect` reports for each G.

    .venv/bin/python benchmarks/router_cost.py [SOURCE]
"""

from __future__ import annotations

import sys

from moekit.checkpoint import open_checkpoint
from moekit.checkpoint.planned import PlannedCheckpoint
from moekit.jobs.inspect import describe
from moekit.surgery.split import divisors, plan_split
from moekit.surgery.upcycle import plan_upcycle


def main(source: str = "smollm2-135m") -> None:
    dense = open_checkpoint(source)
    up = plan_upcycle(dense, "mixtral", 8, 2)
    moe = PlannedCheckpoint(dense, up.outputs, up.config)
    width = up.config["intermediate_size"]
    print("| G | experts | top-k | expert width | router params | router FLOPs/token | share of active expert FLOPs |")
    print("|---|---|---|---|---|---|---|")
    for g in [1, *[d for d in divisors(width) if d & (d - 1) == 0 or d == width]]:  # powers of two, and G = I
        if g == 1:
            ckpt = moe
        else:
            plan = plan_split(moe, g)
            ckpt = PlannedCheckpoint(dense, plan.outputs, plan.config)
        m = describe(ckpt)["moe"]
        print(f"| {g} | {m['experts']:,} | {m['top_k']:,} | {m['expert_width']:,} | {m['router_params'] / 1e6:,.2f}M "
              f"| {m['router_flops_per_token'] / 1e6:,.2f}M | {m['router_flops_share']:.2%} |")


if __name__ == "__main__":
    main(*sys.argv[1:])
