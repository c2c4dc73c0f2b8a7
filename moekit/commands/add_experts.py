from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from moekit.commands.common import (CalibrationOpt, CalibrationTokensOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxShardOpt,
                                    MaybeOverwriteOpt, PickleOpt, RecipeOpt, SeedOpt, handle_errors,
                                    run_surgery)


@handle_errors
def add_experts_command(
    source: Annotated[Optional[str], typer.Argument(help="MoE folder (or a dense model, upcycled first).", show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Argument(help="Output folder (must not exist); built in a hidden .OUTPUT.moekit-partial-PID folder beside it.", show_default=False)] = None,
    new_experts: Annotated[Optional[int], typer.Option("--new-experts", "-m", help="M experts appended to every MoE layer.")] = None,
    init: Annotated[Optional[str], typer.Option(help="copy | mean | random | drop-upcycling: the new experts' weights. [default: copy]")] = None,
    copy_from: Annotated[Optional[str], typer.Option(help="most-used | least-used | an expert id (with copy / drop-upcycling). [default: most-used]")] = None,
    router_init: Annotated[Optional[str], typer.Option(help="copy | kmeans | zero: the new router rows. [default: copy]")] = None,
    calibration: CalibrationOpt = None,
    calibration_tokens: CalibrationTokensOpt = None,
    profile: Annotated[Optional[Path], typer.Option(help="Routing counts from `moekit profile --json` (for most-used / least-used).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", "-k", help="Experts per token after growing. [default: unchanged]")] = None,
    layers: Annotated[Optional[str], typer.Option(help="Only `all`: every MoE layer shares one expert count.")] = None,
    experts: Annotated[Optional[int], typer.Option("--experts", "-n", help="Dense sources only: experts to upcycle to first. [default: 8]")] = None,
    drift_tokens: Annotated[Optional[int], typer.Option(help="Old-domain tokens to measure the drift at init on; 0 skips. [default: 2048]")] = None,
    dtype: DtypeOpt = None,
    max_shard_size: MaxShardOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    recipe: RecipeOpt = None,
    overwrite: MaybeOverwriteOpt = None,
    allow_pickle: PickleOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Append M new experts to every MoE layer of a model, for a new data distribution.

    Old expert ids never move: the new experts get ids N..N+M-1 and new router rows. moekit.json
    carries a freeze manifest (old experts, old router rows and the rest of the network frozen)
    that `moekit train` applies. A new expert that gets traffic changes the output, so the
    command measures the drift at init on old-domain text (built-in English sample); see
    docs/lifelong.md for how --init and --router-init trade drift against traffic.

    With --calibration, kmeans router rows come from new-domain hidden states, and most-used /
    least-used are counted on that text (or read from --profile); without it, on the built-in
    English sample, and the command says so.

    Examples:

        moekit add-experts ./smol-8x2 ./smol-10x2 -m 2 --copy-from most-used --calibration fr.txt
        moekit add-experts ./smol-8x2 ./smol-10x2 -m 2 --init mean --router-init zero
        moekit add-experts ./smol-8x2 ./smol-12x2 -m 4 --router-init kmeans --calibration de.txt
    """
    from moekit.options import AddExpertsOptions, load_options

    opts = load_options(AddExpertsOptions, recipe, dict(
        source=source, output=output, new_experts=new_experts, init=init, copy_from=copy_from, router_init=router_init,
        calibration=calibration, calibration_tokens=calibration_tokens, profile=profile, top_k=top_k, layers=layers,
        experts=experts, drift_tokens=drift_tokens, dtype=dtype, max_shard_size=max_shard_size, seed=seed,
        device=device, overwrite=overwrite, allow_pickle=allow_pickle or None))
    from moekit.grow import run_add_experts

    run_surgery("adding experts", run_add_experts, opts, json_output, describe_growth)


def describe_growth(result, summary: dict) -> list[str]:
    lines = [f"[green]wrote[/] {result.path}: {summary['old_experts']} → {summary['experts']} experts × "
             f"top-{summary['top_k']} ({summary['target']}) in {summary['moe_layers']} layers; "
             f"{summary['trainable_tensors']} tensors trainable in the freeze manifest"]
    if "drift" in summary:
        d = summary["drift"]
        lines.append(f"drift at init on {d['tokens']:,} tokens of {d['text']}: max rel. logit error "
                     f"{d['max_rel_error']:.3g}, top-1 agreement {d['top1_agreement']:.2%}, KL {d['kl_per_token']:.3g}/token")
    return lines
