from __future__ import annotations

from moekit.commands.common import command, run_surgery
from moekit.options import AddExpertsOptions


@command(AddExpertsOptions)
def add_experts_command(opts: AddExpertsOptions) -> None:
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
    from moekit.jobs.add_experts import run_add_experts

    run_surgery("adding experts", run_add_experts, opts, describe_growth)


def describe_growth(result, summary: dict) -> list[str]:
    lines = [f"[green]wrote[/] {result.path}: {summary['old_experts']} → {summary['experts']} experts × "
             f"top-{summary['top_k']} ({summary['target']}) in {summary['moe_layers']} layers; "
             f"{summary['trainable_tensors']} tensors trainable in the freeze manifest"]
    if "drift" in summary:
        d = summary["drift"]
        lines.append(f"drift at init on {d['tokens']:,} tokens of {d['text']}: max rel. logit error "
                     f"{d['max_rel_error']:.3g}, top-1 agreement {d['top1_agreement']:.2%}, KL {d['kl_per_token']:.3g}/token")
    return lines
