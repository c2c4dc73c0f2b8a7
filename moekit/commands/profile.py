from __future__ import annotations

import json
from pathlib import Path

from rich import box
from rich.table import Table

from moekit.commands.common import batch_progress, command, err, out, warn
from moekit.options import ProfileOptions


@command(ProfileOptions)
def profile_command(opts: ProfileOptions) -> None:
    """Measure how balanced an MoE model's routing is on real text.

    Hooks on every router count, on the device, the tokens each expert gets; per MoE layer and in
    total: MaxVio (per batch and global), CV, entropy, dead experts, Switch balance loss per batch
    (local) and over everything (global), router z-loss, drop rates at each capacity factor, the
    most co-selected expert pairs, and with several --data files the load per domain and how
    specialised experts are. Runs data-parallel under `accelerate launch` / `torchrun`.

    Examples:

        moekit profile ./smollm2-glm --data code.txt --data prose.txt --plot plots/ --html report.html
        moekit profile ./mixtral --device cuda --max-tokens 1000000 --json profile.json
        accelerate launch -m moekit profile ./qwen3-moe --data web.jsonl --json profile.json
    """
    from moekit.jobs.profile import run_profile
    from moekit.runtime.models import distributed_rank

    with batch_progress("profiling", distributed_rank()[0] == 0 and str(opts.json_out) != "-") as progress:
        report, warnings = run_profile(opts, progress)
    if report is None:  # not the main process
        return
    for w in warnings:
        warn(w)
    publish(report, opts.json_out, opts.plot, opts.html_out)


def publish(report: dict, json_out: Path | None, plot: Path | None, html_out: Path | None) -> None:
    """Tables on the terminal (unless JSON goes to stdout), then the requested files."""
    from moekit.report.profile import figures, html_page, sections, write_plots

    if str(json_out) == "-":
        out.print_json(json.dumps(report))
    else:
        for s in sections(report):
            out.print(rich_table(s.title, s.headers, s.rows))
        if json_out:
            json_out.write_text(json.dumps(report, indent=1))
            err.print(f"[green]wrote[/] {json_out}")
    if plot or html_out:
        images = figures(report)
        if plot:
            for path in write_plots(images, plot):
                err.print(f"[green]wrote[/] {path}")
        if html_out:
            html_out.write_text(html_page(report, images), encoding="utf-8")
            err.print(f"[green]wrote[/] {html_out}")


def rich_table(title: str, headers: list[str], rows: list[list[str]]) -> Table:
    # No vertical rules and one space between columns: 11 columns fit an 80-column terminal.
    t = Table(title=title, title_justify="left", show_header=any(headers), box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0, 0, 1),
              pad_edge=False)
    for i, h in enumerate(headers):
        key_value = not any(headers)  # the summary: names and values, both read left to right
        t.add_column(h, justify="left" if i == 0 or key_value else "right", style="bold" if i == 0 and key_value else None)
    for row in rows:
        t.add_row(*row)
    return t
