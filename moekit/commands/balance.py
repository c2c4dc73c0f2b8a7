from __future__ import annotations

from rich.table import Table

from moekit.commands.common import (batch_progress, byte_progress, command, err, out, print_json, run_settings, warn,
                                    written)
from moekit.errors import MoekitError
from moekit.options import BalanceOptions

TARGET = 0.05  # DeepSeek's loss-free balancing reaches MaxVio_global ≈ 0.04


@command(BalanceOptions)
def balance_command(opts: BalanceOptions) -> None:
    """Balance a sigmoid-routed MoE (GLM-4.5, DeepSeek-V3, dots1) without training: calibrate
    its `e_score_correction_bias` by DeepSeek's loss-free balancing and write a copy.

    After each batch of --data every layer's bias moves towards the starved experts:
    b_i += u·sign(c̄ − c_i), no gradients, bias in fp32; u is --rate, or with the default adaptive
    step at most --rate, halved for an expert whose direction flips. The bias written is the mean
    over the last half of the steps (one batch's noise averaged out). Which experts a token goes
    to changes; the weights it gets from them do not. Reports MaxVio_global on held-out text before and after
    (DeepSeek's loss-free balancing reaches about 0.04). Other routing families have no such bias
    and are refused.

    Examples:

        moekit balance ./smollm2-glm ./smollm2-glm-balanced --data calib.txt
        moekit balance ./glm ./glm-bal --data web.jsonl --eval-data held.jsonl --steps 500 --device cuda
    """
    import torch

    from moekit.jobs.balance import BIAS, calibrate_bias, check_balanceable, write_balanced
    from moekit.checkpoint import open_checkpoint
    from moekit.checkpoint.writer import check_target
    from moekit.runtime.models import load_model, load_tokenizer
    from moekit.jobs.profile import Domain, find_moe_layers, profile, token_rows
    from moekit.data.text import calibration_texts, read_texts

    where, torch_dtype = run_settings(opts.device, opts.dtype)
    ckpt = open_checkpoint(opts.model)
    check_balanceable(ckpt.config)
    check_target(opts.output, [ckpt.path], opts.overwrite)  # before minutes of calibration, not after
    tokenizer = load_tokenizer(opts.model)
    what = str(opts.data) if opts.data else "the built-in sample"
    rows = token_rows(calibration_texts(opts.data), tokenizer, opts.seq_len, opts.max_tokens, what)
    # Shuffled (seeded): consecutive sequences come from the same document, and a bias that
    # chases one document per batch does not balance the whole text.
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))]
    if opts.eval_data:
        held = token_rows(read_texts(opts.eval_data), tokenizer, opts.seq_len, opts.max_tokens, str(opts.eval_data))
    elif len(rows) < 2:
        raise MoekitError(f"{what}: one sequence of {opts.seq_len} tokens; calibration and held-out text need two "
                          "(or give --eval-data)")
    else:
        split = len(rows) - max(1, len(rows) // 4)
        rows, held = rows[:split], rows[split:]
    loaded, warnings = load_model(opts.model, torch_dtype, where, complete=True)
    for w in warnings:
        warn(w)
    moe = find_moe_layers(loaded)
    held_out = [Domain("held-out", list(held.split(opts.batch_size)))]
    with batch_progress("MaxVio before", not opts.json_output) as progress:
        before = profile(loaded, held_out, progress=progress)
    with batch_progress("calibrating", not opts.json_output) as progress:
        biases = calibrate_bias(loaded, moe, list(rows.split(opts.batch_size)), opts.steps, opts.rate,
                                not opts.fixed_rate, progress)
    with batch_progress("MaxVio after", not opts.json_output) as progress:
        after = profile(loaded, held_out, progress=progress)

    layers = []
    for layer, b, a in zip(moe.layers, before["layers"], after["layers"]):
        bias = biases[f"{layer.name}.{BIAS}"]
        layers.append({"layer": layer.index, "maxvio_before": b["maxvio_global"], "maxvio_after": a["maxvio_global"],
                       "bias_min": bias.min().item(), "bias_max": bias.max().item()})
    summary = {"maxvio_global_before": before["total"]["maxvio_global"],
               "maxvio_global_after": after["total"]["maxvio_global"],
               "worst_layer_before": max(x["maxvio_before"] for x in layers),
               "worst_layer_after": max(x["maxvio_after"] for x in layers),
               "steps": opts.steps, "rate": opts.rate, "calibration_tokens": rows.numel(),
               "held_out_tokens": held.numel()}
    options = {"data": str(opts.data) if opts.data else "built-in sample",
               "eval_data": str(opts.eval_data) if opts.eval_data else None, "rate": opts.rate, "steps": opts.steps,
               "fixed_rate": opts.fixed_rate, "max_tokens": opts.max_tokens, "batch_size": opts.batch_size,
               "seq_len": opts.seq_len, "dtype": str(torch_dtype)}
    with byte_progress("writing", not opts.json_output) as progress:
        result = write_balanced(ckpt, opts.output, biases, options=options, layers=layers, summary=summary,
                                overwrite=opts.overwrite, progress=progress)
    for w in result.warnings:
        warn(w)
    if opts.json_output:
        print_json({**summary, **written(result), "layers": layers})
        return
    t = Table(title=f"balance: MaxVio_global on {held.numel():,} held-out tokens", title_justify="left")
    for h in ("layer", "before", "after", "bias min", "bias max"):
        t.add_column(h, justify="right")
    for x in layers:
        t.add_row(str(x["layer"]), f"{x['maxvio_before']:.3f}", f"{x['maxvio_after']:.3f}", f"{x['bias_min']:+.4f}",
                  f"{x['bias_max']:+.4f}")
    t.add_row("mean", f"{summary['maxvio_global_before']:.3f}", f"{summary['maxvio_global_after']:.3f}", "", "",
              style="bold")
    out.print(t)
    verdict = ("[green]within[/]" if summary["maxvio_global_after"] <= TARGET
               else "[yellow]above[/] (more --steps or a larger --rate)")
    err.print(f"[green]wrote[/] {result.path}: MaxVio_global {summary['maxvio_global_before']:.3f} → "
              f"{summary['maxvio_global_after']:.3f}, {verdict} the {TARGET} goal", highlight=False)
