from __future__ import annotations

from moekit.commands.common import command, run_surgery
from moekit.options import SplitOptions


@command(SplitOptions)
def split_command(opts: SplitOptions) -> None:
    """Split each expert into G fine-grained experts of width I/G, preserving the function.

    Children of an expert share its router row and top-k becomes K·G, so the children of the
    experts the old router chose are chosen together; each child's down projection is scaled so
    the routing weights add up as before (the factor depends on the routing family: see
    docs/split-granularity.md). A dense source is upcycled and split in one pass (MoEfication).

    Examples:

        moekit split-granularity ./smol-8x2 ./smol-32x8 --granularity 4
        moekit split-granularity ./smol-8x2 ./smol-32x8-km -g 4 --partition kmeans
        moekit split-granularity smollm2-135m ./smol-g8 -g 8 --target mixtral
    """
    from moekit.jobs.split_granularity import run_split

    run_surgery("splitting", run_split, opts, lambda result, summary: [
        f"[green]wrote[/] {result.path}: {summary['from']} → {summary['experts']} experts × top-{summary['top_k']} "
        f"({summary['target']}, G={summary['granularity']}, {summary['partition']}) in {summary['moe_layers']} layers, "
        f"{result.bytes_written / 1e6:,.1f} MB in {result.seconds:.1f} s ({result.mb_per_s:,.0f} MB/s)"])
