from __future__ import annotations

from moekit.commands.common import command, run_surgery
from moekit.options import PruneOptions


@command(PruneOptions)
def prune_command(opts: PruneOptions) -> None:
    """Remove the experts that matter least on calibration text, the same number in every layer.

    Scores per expert, over the calibration tokens routed to it: **reap** = mean of gate weight ×
    ‖expert output‖ (Cerebras' REAP), **ean** = Σ ‖expert output‖, **frequency** = tokens routed,
    **random** = a seeded baseline. Kept experts are renumbered densely in their old order (the map
    and all scores go into moekit.json); router rows and selection biases are sliced; shared experts
    are untouched; kept tensors are copied as byte ranges of the source. Softmax routers without
    renormalisation (norm_topk_prob false) give the surviving experts different weights: a warning
    says so (see docs/prune.md). Scores run on the GPU when there is one (transformers 5.x).

    Examples:

        moekit prune ./moe-8x2 ./moe-6x2 --ratio 0.25 --method reap --calibration code.txt
        moekit prune ./moe-8x2 ./moe-4x2 --keep 4 --method frequency --profile profile.json
        moekit prune ./qwen3-moe ./qwen3-moe-64 --keep 64 --method ean --calibration-tokens 65536
    """
    from moekit.jobs.prune import run_prune

    run_surgery("pruning", run_prune, opts, lambda result, summary: [
        f"[green]wrote[/] {result.path}: {summary['from']} → {summary['experts']} experts × top-{summary['top_k']} "
        f"({summary['target']}, {summary['method']} on {summary['scored_on']}) in {summary['moe_layers']} layers, "
        f"{result.bytes_written / 1e6:,.1f} MB in {result.seconds:.1f} s ({result.mb_per_s:,.0f} MB/s)"])
