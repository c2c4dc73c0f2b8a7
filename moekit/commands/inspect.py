from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from moekit.commands.common import command, out, print_json
from moekit.options import InspectOptions


@command(InspectOptions)
def inspect_command(opts: InspectOptions) -> None:
    """Describe a checkpoint from its config and tensor headers: no weights are loaded.

    Shows the architecture, layers, widths, experts / top-k / shared experts, the routing family,
    parameters total and active per token, dtypes and file sizes, and for the MoE architectures
    moekit writes, the runtimes (transformers 5.x / 4.57, llama.cpp, vLLM) known to compute it. Where the checkpoint does not
    say something, the report says so in its notes instead of guessing.

    Examples:

        moekit inspect smollm2-135m
        moekit inspect ./my-moe --json | jq .moe
    """
    from moekit.arch import runtimes
    from moekit.checkpoint import open_checkpoint
    from moekit.jobs.inspect import describe

    ckpt = open_checkpoint(opts.source, allow_pickle=opts.allow_pickle)
    report = describe(ckpt)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    report["runtimes"] = runtimes.report(runtimes.Facts.of_folder(folder, ckpt.config, ckpt.tensors))
    if opts.json_output:
        print_json(report)
    else:
        out.print(report_table(report))


def _n(x) -> str:
    return "[yellow]unknown[/]" if x is None else f"{x:,}" if isinstance(x, int) else str(x)


def _params(x: int) -> str:
    return f"{x / 1e6:,.1f}M" if x < 1e9 else f"{x / 1e9:,.2f}B"


def report_table(r: dict) -> Table:
    t = Table(title=f"{r['model_type']} — {r['kind']}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("source", r["source"])
    t.add_row("format", r["format"])
    t.add_row("architecture", ", ".join(r["architectures"] or ["[yellow]unknown[/]"]))
    t.add_row("layers", _n(r["num_layers"]))
    t.add_row("hidden size", _n(r["hidden_size"]))
    t.add_row("vocab", _n(r["vocab_size"]))
    if r["kind"] == "dense":
        t.add_row("d_ff", _n(r.get("dense_ffn_width")))
    else:
        m = r["moe"]
        t.add_row("routing", m["routing"])
        t.add_row("experts × top-k", f"{_n(m['experts'])} × {_n(m['top_k'])}")
        t.add_row("shared experts", _n(m["shared_experts"]))
        t.add_row("expert width", _n(m["expert_width"]))
        t.add_row("MoE layers", f"{m['moe_layers']} ({m['num_moe_layers']})")
        t.add_row("dense layers", m["dense_layers"])
        if "router_flops_share" in m:
            t.add_row("router cost", f"{_params(m['router_params'])} params, {m['router_flops_share']:.2%} of active expert FLOPs")
    t.add_row("params total", _params(r["params_total"]))
    t.add_row("params active/token", _params(r["params_active_per_token"]))
    t.add_row("dtypes", ", ".join(f"{k} ×{v}" for k, v in r["dtypes"].items()))
    t.add_row("size on disk", f"{r['bytes_total'] / 1e6:,.1f} MB in {len(r['files'])} file(s)")
    for note in r["notes"]:
        t.add_row("[yellow]note[/]", note)
    for run in r.get("runtimes", []):  # known only for the MoE architectures moekit writes (moekit.arch.runtimes)
        colour = {"exact": "green", "wrong": "yellow", "fails": "red"}[run["status"]]
        t.add_row(f"runs in {run['runtime']}", f"[{colour}]{run['status']}[/] ({run['how']})"
                  + (f": {escape(run['why'])}" if "why" in run else ""))
    return t
