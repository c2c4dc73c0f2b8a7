from __future__ import annotations

from moekit.commands.common import command, run_surgery
from moekit.options import UpcycleOptions


@command(UpcycleOptions)
def upcycle_command(opts: UpcycleOptions) -> None:
    """Turn a dense checkpoint into a native MoE checkpoint: every expert a copy of the FFN.

    Without --noise / --drop-upcycling the result computes exactly what the parent computes (its
    routing weights sum to 1 over identical experts; with --routing softmax-topk a zero router and
    down_proj × N/K do the same), until you train it. Where a runtime will not compute it (e.g.
    renormalised qwen2_moe in llama.cpp), a warning and the model card say so (docs/runtimes.md). Tensors are streamed:
    memory stays at a few tensors whatever the model size.

    Examples:

        moekit upcycle smollm2-135m ./smol-moe --experts 8 --top-k 2 --dtype bfloat16
        moekit upcycle ./qwen3-dense ./qwen3-moe -n 16 -k 4 --moe-layers every:2
        moekit upcycle ./llama ./glm --target glm4_moe --shared-experts 1 --router-init kmeans
        moekit upcycle ./qwen3 ./qwen3-moe -n 8 -k 2 --routing softmax-topk   # no renormalisation
        moekit upcycle --recipe recipes/smollm2-mixtral-8x2.yaml
    """
    from moekit.jobs.upcycle import run_upcycle

    run_surgery("upcycling", run_upcycle, opts, lambda result, summary: [
        f"[green]wrote[/] {result.path}: {summary['experts']} experts × top-{summary['top_k']} "
        f"({summary['target']}) in {summary['moe_layers']} layers, params {summary['params_total'] / 1e6:,.1f}M total / "
        f"{summary['params_active'] / 1e6:,.1f}M active, {result.bytes_written / 1e6:,.1f} MB "
        f"in {result.seconds:.1f} s ({result.mb_per_s:,.0f} MB/s)"])
