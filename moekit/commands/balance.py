from __future__ import annotations

from rich.table import Table

from moekit.commands.common import batch_progress, byte_progress, command, err, out, print_json, warn, written
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
    from moekit.jobs.balance import run_balance

    result, summary, layers = run_balance(opts, lambda label: batch_progress(label, not opts.json_output),
                                          lambda: byte_progress("writing", not opts.json_output))
    for w in result.warnings:
        warn(w)
    if opts.json_output:
        print_json({**summary, **written(result), "layers": layers})
        return
    t = Table(title=f"balance: MaxVio_global on {summary['held_out_tokens']:,} held-out tokens", title_justify="left")
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
