from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moekit.commands.common import (CalibrationOpt, CalibrationTokensOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxShardOpt,
                                    MaybeOverwriteOpt, PickleOpt, RecipeOpt, SeedOpt, handle_errors,
                                    run_surgery)
from moekit.data import FORMATS as TEXT_FORMATS


@handle_errors
def upcycle_command(
    source: Annotated[Optional[str], typer.Argument(help="Dense model folder, .gguf, or smollm2-135m.", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Argument(help="Output folder (must not exist); built in a hidden .OUTPUT.moekit-partial-PID folder beside it.", show_default=False)] = None,
    experts: Annotated[Optional[int], typer.Option("--experts", "-n", help="Experts per MoE layer, N ≥ 2. [default: 8]")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", help="Experts per token, 1 ≤ K ≤ N. [default: 2]")] = None,
    target: Annotated[Optional[str], typer.Option(help="mixtral, qwen2_moe, qwen3_moe, glm4_moe, flex_olmo, granitemoe, granitemoeshared. [default: the parent family's natural target]")] = None,
    shared_experts: Annotated[Optional[int], typer.Option(help="Shared experts (qwen2_moe: 1, glm4_moe: 1-8, granitemoeshared: 1); they start with zero output.")] = None,
    routing: Annotated[Optional[str], typer.Option(help="renormalised (top-k weights sum to 1) | softmax-topk (softmax over all N, top-K, no renormalisation: qwen2_moe, qwen3_moe, flex_olmo; exact at init with a zero router, down_proj × N/K). [default: renormalised]")] = None,
    router_init: Annotated[Optional[str], typer.Option(help="random | uniform | zero | kmeans | prompts. [default: random; zero with --routing softmax-topk]")] = None,
    calibration: CalibrationOpt = None,
    calibration_tokens: CalibrationTokensOpt = None,
    prompts: Annotated[Optional[list[Path]], typer.Option("--prompts", help=f"One prompt file per expert for --router-init prompts (repeat the flag): {TEXT_FORMATS}, a prompt each.")] = None,
    negative_prompts: Annotated[Optional[Path], typer.Option(help=f"Prompts no expert should prefer (with --router-init prompts): {TEXT_FORMATS}, a prompt each.")] = None,
    noise: Annotated[Optional[float], typer.Option(help="Relative Gaussian noise σ on expert weights (breaks exactness).")] = None,
    drop_upcycling: Annotated[Optional[float], typer.Option(help="Re-draw this ratio of each expert's neurons (Drop-Upcycling; breaks exactness).")] = None,
    moe_layers: Annotated[Optional[str], typer.Option(help="all | every:2 | 0-3,20-29 | skip-first:2,skip-last:2. [default: all]")] = None,
    expert_sources: Annotated[Optional[str], typer.Option(help="A,B,...: expert i's FFN from fine-tune i of the same base (Branch-Train-MiX).")] = None,
    dtype: DtypeOpt = None,
    max_shard_size: MaxShardOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    recipe: RecipeOpt = None,
    overwrite: MaybeOverwriteOpt = None,
    allow_pickle: PickleOpt = False,
    json_output: JsonOpt = False,
) -> None:
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
    from moekit.options import UpcycleOptions, load_options

    opts = load_options(UpcycleOptions, recipe, dict(
        source=source, output=output, experts=experts, top_k=top_k, target=target, shared_experts=shared_experts,
        routing=routing, router_init=router_init, calibration=calibration, calibration_tokens=calibration_tokens, prompts=prompts or [], negative_prompts=negative_prompts,
        noise=noise, drop_upcycling=drop_upcycling, moe_layers=moe_layers,
        expert_sources=expert_sources.split(",") if expert_sources else [], dtype=dtype,
        max_shard_size=max_shard_size, seed=seed, device=device, overwrite=overwrite, allow_pickle=allow_pickle or None))
    from moekit.upcycle import run_upcycle

    run_surgery("upcycling", run_upcycle, opts, json_output, lambda result, summary: [
        f"[green]wrote[/] {result.path}: {summary['experts']} experts × top-{summary['top_k']} "
        f"({summary['target']}) in {summary['moe_layers']} layers, params {summary['params_total'] / 1e6:,.1f}M total / "
        f"{summary['params_active'] / 1e6:,.1f}M active, {result.bytes_written / 1e6:,.1f} MB "
        f"in {result.seconds:.1f} s ({result.mb_per_s:,.0f} MB/s)"])
