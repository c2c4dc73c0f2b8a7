"""Presenting a profile (moekit.jobs.profile.build_report): tables, PNG figures, one HTML page.

Tables are plain data (title, headers, rows of strings) so the terminal (rich) and the HTML page
show the same thing. Figures use matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Section:
    title: str
    headers: list[str]
    rows: list[list[str]]


def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def pct(v) -> str:
    return "–" if v is None else f"{v:.1%}"


def sections(r: dict) -> list[Section]:
    t, cfs, domains = r["total"], r["capacity_factors"], [d["name"] for d in r["domains"]]
    summary = [
        ["model", f"{r['model']} ({r['model_type']}: {r['experts']} experts, top-{r['top_k']}, {r['moe_layers']} MoE layers)"],
        ["routing", r["routing"]],
        ["data", ", ".join(f"{d['name']} {d['tokens']:,} tokens" for d in r["domains"])],
        ["run", f"{r['device']}, {r['dtype']}, {r['processes']} process(es), {r['batches']:,} batches of "
                f"{r['batch_size']}×{r['seq_len']}, {r['seconds']:.1f} s, {r['tokens_per_s']:,.0f} tokens/s"],
        ["MaxVio global / batch mean / batch max", f"{fmt(t['maxvio_global'])} / {fmt(t['maxvio_batch_mean'])} / {fmt(t['maxvio_batch_max'])}"],
        ["CV of load", fmt(t["cv"])],
        ["entropy H of load / of router (normalised)", f"{fmt(t['load_entropy'])} / {fmt(t['router_entropy'])}"],
        ["dead experts", fmt(t["dead_experts"])],
        ["balance loss N·Σf·P local / global", f"{fmt(t['aux_loss_local'])} / {fmt(t['aux_loss_global'])}"],
        ["router z-loss", fmt(t["z_loss"])],
        ["drop rate at capacity factor", "  ".join(f"{cf}: {pct(t['drop_rate'][str(cf)])}" for cf in cfs)],
    ]
    if len(domains) > 1:
        summary.append(["specialisation (0 same experts … 1 disjoint)", fmt(t["specialisation"])])
        summary.append(["MaxVio global per domain", "  ".join(f"{n}: {fmt(t['domains'][n]['maxvio_global'])}" for n in domains)])
    out = [Section("profile: routing balance (means over MoE layers)", ["", ""], summary)]

    out.append(Section("per layer", ["layer", "MaxVio\nglobal", "MaxVio\nbatch\nmean", "MaxVio\nbatch\nmax", "CV",
                                     "H\nload", "H\nrouter", "dead", "LBL\nlocal", "LBL\nglobal", "z-loss"],
                       [[str(x["layer"]), fmt(x["maxvio_global"]), fmt(x["maxvio_batch_mean"]), fmt(x["maxvio_batch_max"]),
                         fmt(x["cv"]), fmt(x["load_entropy"]), fmt(x["router_entropy"]),
                         ",".join(map(str, x["dead_experts"])) or "0", fmt(x["aux_loss_local"]), fmt(x["aux_loss_global"]),
                         fmt(x["z_loss"], 2)] for x in r["layers"]]))

    headers = ["layer", *(f"drop\n@{cf}" for cf in cfs)]
    if len(domains) > 1:
        headers += ["special-\nisation", *(f"MaxVio\n{n}" for n in domains)]
    rows = []
    for x in r["layers"]:
        row = [str(x["layer"]), *(pct(x["drop_rate"][str(cf)]) for cf in cfs)]
        if len(domains) > 1:
            row += [fmt(x["specialisation"]), *(fmt(x["domains"][n]["maxvio_global"]) for n in domains)]
        rows.append(row)
    out.append(Section("capacity drops" + (" and domains" if len(domains) > 1 else "") + " per layer", headers, rows))

    pairs = sorted(((p, x["layer"]) for x in r["layers"] for p in x["top_pairs"]), key=lambda pl: -pl[0]["share"])[:10]
    if pairs:
        out.append(Section("most co-selected expert pairs (lift: × chance)", ["layer", "experts", "tokens", "share", "lift"],
                           [[str(layer), f"{p['experts'][0]} + {p['experts'][1]}", fmt(p["tokens"]), pct(p["share"]),
                             fmt(p["lift"], 2)] for p, layer in pairs]))
    return out


# --------------------------------------------------------------------------- figures


def _load_ratios(r: dict, domain: str | None):
    """[layers, experts] load / ideal load (1 = balanced)."""
    import numpy as np

    rows = [x["domains"][domain]["tokens_per_expert"] if domain else x["tokens_per_expert"] for x in r["layers"]]
    counts = np.asarray(rows, dtype=float)
    return counts / np.maximum(counts.mean(axis=1, keepdims=True), 1e-12)


def figures(r: dict) -> dict[str, bytes]:
    """PNG images by file name: the layer × expert load heatmap (all text, then each domain),
    and MaxVio per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    layers = [x["layer"] for x in r["layers"]]
    domains = [d["name"] for d in r["domains"]]
    panels = [("all text", None)] + ([(n, n) for n in domains] if len(domains) > 1 else [])
    ratios = [_load_ratios(r, d) for _, d in panels]
    top = max(2.0, max(float(x.max()) for x in ratios))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)  # white = balanced, red = overloaded, blue = starved
    width = min(4 + 0.22 * r["experts"], 12)
    height = min(1.5 + 0.22 * len(layers), 10)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False, sharey=True)
    for ax, (title, _), ratio in zip(axes[0], panels, ratios):
        im = ax.imshow(ratio, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_title(f"load / ideal: {title}")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=7 if len(layers) > 16 else 9)
    axes[0][0].set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="tokens routed / ideal K·T/N")
    images = {"load.png": _png(fig)}

    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(layers) + 3), 4))
    x = range(len(layers))
    ax.bar(x, [v["maxvio_global"] or 0 for v in r["layers"]], color="#4878a8", label="MaxVio global")
    ax.plot(x, [v["maxvio_batch_mean"] or 0 for v in r["layers"]], "o-", color="#e08020", label="MaxVio batch (mean)")
    ax.plot(x, [v["maxvio_batch_max"] or 0 for v in r["layers"]], "^:", color="#c03030", label="MaxVio batch (max)")
    for name, colour in zip(domains if len(domains) > 1 else [], ["#2a9d50", "#8a4fb0", "#6b6b6b", "#d4a017"] * 4):
        ax.plot(x, [v["domains"][name]["maxvio_global"] or 0 for v in r["layers"]], "--", color=colour,
                label=f"MaxVio global: {name}")
    ax.set_xticks(list(x), [str(i) for i in layers], fontsize=7 if len(layers) > 16 else 9)
    ax.set_xlabel("layer")
    ax.set_ylabel("(max load − ideal) / ideal")
    ax.set_title(f"MaxVio per layer ({r['experts']} experts, top-{r['top_k']})")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # room for the legend above the data
    ax.legend(fontsize=8, ncol=3, loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    images["maxvio.png"] = _png(fig)
    return images


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_plots(images: dict[str, bytes], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in images.items():
        (directory / name).write_bytes(data)
        paths.append(directory / name)
    return paths


def html_page(r: dict, images: dict[str, bytes]) -> str:
    """One self-contained page: the tables and the figures (PNG embedded as base64)."""
    parts = [f"<h1>moekit profile: {html.escape(r['model'])}</h1>"]
    for s in sections(r):
        head = "".join(f"<th>{html.escape(h).replace(chr(10), '<br>')}</th>" for h in s.headers) if any(s.headers) else ""
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in s.rows)
        parts.append(f"<h2>{html.escape(s.title)}</h2><table>{f'<tr>{head}</tr>' if head else ''}{body}</table>")
    for name, data in images.items():
        parts.append(f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" '
                     f'src="data:image/png;base64,{base64.b64encode(data).decode()}">')
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "margin-bottom:1em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
             "td:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>moekit profile</title><style>{style}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
