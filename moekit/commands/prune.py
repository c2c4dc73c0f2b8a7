from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moekit.commands.common import (CalibrationOpt, CalibrationTokensOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxShardOpt,
                                    MaybeOverwriteOpt, PickleOpt, RecipeOpt, SeedOpt, handle_errors,
                                    run_surgery)


@handle_errors
def prune_command(
    source: Annotated[Optional[str], typer.Argument(help="MoE model folder (any family moekit reads).", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Argument(help="Output folder (must not exist).", show_default=False)] = None,
    keep: Annotated[Optional[int], typer.Option("--keep", "-n", help="N': experts kept in every MoE layer.")] = None,
    ratio: Annotated[Optional[float], typer.Option(help="Share of the experts removed instead of --keep, e.g. 0.25 or 0.5.")] = None,
    method: Annotated[Optional[str], typer.Option(help="reap | frequency | ean | random: how experts are scored. [default: reap]")] = None,
    calibration: CalibrationOpt = None,
    calibration_tokens: CalibrationTokensOpt = None,
    profile: Annotated[Optional[Path], typer.Option(help="Routing counts from `moekit profile --json` instead of a calibration pass (--method frequency).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", help="Lower top-k to this (needed when it exceeds --keep). [default: unchanged]")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Only `all`: every MoE layer shares one expert count.")] = None,
    dtype: DtypeOpt = None,
    max_shard_size: MaxShardOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    recipe: RecipeOpt = None,
    overwrite: MaybeOverwriteOpt = None,
    allow_pickle: PickleOpt = False,
    json_output: JsonOpt = False,
) -> None:
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
    from moekit.options import PruneOptions, load_options

    opts = load_options(PruneOptions, recipe, dict(
        source=source, output=output, keep=keep, ratio=ratio, method=method, calibration=calibration,
        calibration_tokens=calibration_tokens, profile=profile, top_k=top_k, layers=layers, dtype=dtype,
        max_shard_size=max_shard_size, seed=seed, device=device, overwrite=overwrite, allow_pickle=allow_pickle or None))
    from moekit.prune import run_prune

    run_surgery("pruning", run_prune, opts, json_output, lambda result, summary: [
        f"[green]wrote[/] {result.path}: {summary['from']} → {summary['experts']} experts × top-{summary['top_k']} "
        f"({summary['target']}, {summary['method']} on {summary['scored_on']}) in {summary['moe_layers']} layers, "
        f"{result.bytes_written / 1e6:,.1f} MB in {result.seconds:.1f} s ({result.mb_per_s:,.0f} MB/s)"])
