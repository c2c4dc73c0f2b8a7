from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moekit.commands.common import (CalibrationOpt, CalibrationTokensOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxShardOpt,
                                    MaybeOverwriteOpt, PickleOpt, RecipeOpt, SeedOpt, handle_errors,
                                    run_surgery)


@handle_errors
def split_command(
    source: Annotated[Optional[str], typer.Argument(help="MoE folder moekit can read, or a dense model (upcycled on the fly).", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Argument(help="Output folder (must not exist); built in a hidden .OUTPUT.moekit-partial-PID folder beside it.", show_default=False)] = None,
    granularity: Annotated[Optional[int], typer.Option("--granularity", "-g", help="G: children per expert; must divide the expert width.")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", help="Experts per token after the split. [default: K·G, exact]")] = None,
    partition: Annotated[Optional[str], typer.Option(help="contiguous | random | kmeans | coactivation: which neurons go together. [default: contiguous]")] = None,
    calibration: CalibrationOpt = None,
    calibration_tokens: CalibrationTokensOpt = None,
    target: Annotated[Optional[str], typer.Option(help="Dense sources only: the MoE architecture to write. [default: the family's natural target]")] = None,
    shared_experts: Annotated[Optional[int], typer.Option(help="Dense sources only: shared experts (zero output at start).")] = None,
    moe_layers: Annotated[Optional[str], typer.Option(help="Dense sources only: which layers become MoE (as in upcycle).")] = None,
    dtype: DtypeOpt = None,
    max_shard_size: MaxShardOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    recipe: RecipeOpt = None,
    overwrite: MaybeOverwriteOpt = None,
    allow_pickle: PickleOpt = False,
    json_output: JsonOpt = False,
) -> None:
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
    from moekit.options import SplitOptions, load_options

    opts = load_options(SplitOptions, recipe, dict(
        source=source, output=output, granularity=granularity, top_k=top_k, partition=partition,
        calibration=calibration, calibration_tokens=calibration_tokens, target=target, shared_experts=shared_experts,
        moe_layers=moe_layers, dtype=dtype, max_shard_size=max_shard_size, seed=seed, device=device,
        overwrite=overwrite, allow_pickle=allow_pickle or None))
    from moekit.split import run_split

    run_surgery("splitting", run_split, opts, json_output, lambda result, summary: [
        f"[green]wrote[/] {result.path}: {summary['from']} → {summary['experts']} experts × top-{summary['top_k']} "
        f"({summary['target']}, G={summary['granularity']}, {summary['partition']}) in {summary['moe_layers']} layers, "
        f"{result.bytes_written / 1e6:,.1f} MB in {result.seconds:.1f} s ({result.mb_per_s:,.0f} MB/s)"])
