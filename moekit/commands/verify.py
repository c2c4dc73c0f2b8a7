from __future__ import annotations

import math
from contextlib import nullcontext

import typer
from rich.table import Table

from moekit.commands.common import command, err, out, print_json, warn
from moekit.errors import EXIT_CHECK_FAILED
from moekit.options import VerifyOptions


@command(VerifyOptions)
def verify_command(opts: VerifyOptions) -> None:
    """Check that CHILD computes what PARENT computes: run both on the same tokens, compare logits.

    Both models are loaded by stock transformers (no remote code) and run on the same token ids:
    random ones by default (seeded, below the smaller vocabulary), or text from --data. Reports
    the max relative logit error (max |parent - child| / max |parent| over every position), the
    mean absolute error, top-1 agreement and KL(parent || child) per token.

    Exit 0 when the max relative error is within --tolerance, 1 beyond it. An exact surgery
    (upcycle, split-granularity) stays near 1e-6 in float32; bfloat16 needs a looser tolerance.

    Examples:

        moekit verify smollm2-135m ./smollm2-moe
        moekit verify ./moe ./moe-fine --data notes.txt --tokens 2048 --device cuda
        moekit verify ./base ./grown --tolerance 1e-3 --json | jq .top1_agreement
        moekit verify ./smollm2 ./smollm2-8x2 --runtime llama.cpp --tolerance 1e-4 --tokens 512
    """
    from moekit.jobs.verify import run_verify

    def status(label: str):
        """A spinner on stderr while a slow step runs (not with --json, not off a terminal)."""
        return err.status(label, spinner="dots") if not opts.json_output and err.is_terminal else nullcontext()

    finish(run_verify(opts, status), opts.json_output)


def finish(report: dict, json_output: bool) -> None:
    """Print the report and the verdict; exit 1 beyond the tolerance (or on a different generation)."""
    tolerance, warnings = report["tolerance"], report["warnings"]
    # NaN/inf errors compare False, so broken logits fail; with --prompt the text must match too
    passed = report["max_rel_error"] <= tolerance and report.get("same_generation", True)
    report["passed"] = passed
    for w in warnings:
        warn(w)
    if json_output:  # JSON has no NaN/inf: those (broken logits) print as null
        print_json({k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in report.items()})
    else:
        out.print(report_table(report))
    verdict = (f"{report['max_rel_error']:.3g} {'≤' if passed else '>'} tolerance {tolerance:.3g} "
               f"over {report['tokens']:,} tokens ({report['top1_agreement']:.2%} same top-1)")
    err.print(f"[bold green]PASS[/] {verdict}" if passed else f"[bold red]FAIL[/] {verdict}", highlight=False)
    if not passed:
        raise typer.Exit(EXIT_CHECK_FAILED)


def report_table(r: dict) -> Table:
    t = Table(title="verify: CHILD against PARENT", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("parent", f"{r['parent']} ({r['parent_type']})")
    t.add_row("child", f"{r['child']} ({r['child_type']})")
    t.add_row("inputs", f"{r['inputs']}: {r['tokens']:,} tokens in {r['sequences']:,} sequences")
    t.add_row("run", f"{r['device']}, {r['dtype']}, vocab {r['vocab_compared']:,}")
    t.add_row("max relative error", f"{r['max_rel_error']:.3g}  (tolerance {r['tolerance']:.3g})")
    t.add_row("max / mean abs error", f"{r['max_abs_error']:.3g} / {r['mean_abs_error']:.3g}  (max |logit| {r['max_abs_logit']:.3g})")
    t.add_row("top-1 agreement", f"{r['top1_agreement']:.2%}")
    t.add_row("KL(parent‖child)", f"{r['kl_per_token']:.3g} per token")
    if "prompt" in r:
        t.add_row("prompt", r["prompt"])
        t.add_row("parent generates", r["parent_generation"])
        t.add_row("child generates", r["child_generation"])
        t.add_row("same generation", "[green]yes[/]" if r["same_generation"] else "[red]no[/]")
    t.add_row("seconds", f"{r['seconds']:.1f} compare, {r['load_seconds']:.1f} load")
    return t
