from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich import box
from rich.table import Table

from moekit.commands.common import PickleOpt, err, handle_errors, out, warn
from moekit.data import FORMATS as TEXT_FORMATS
from moekit.errors import MoekitError, UsageError

ModelArg = Annotated[str, typer.Argument(show_default=False, help="MoE model folder (any MoE family transformers loads).")]
DataOpt = Annotated[Optional[list[Path]], typer.Option("--data", help=f"Text file: {TEXT_FORMATS}; repeat for several domains. [default: built-in sample of real English text]", show_default=False)]
MaxTokensOpt = Annotated[int, typer.Option(min=1, help="Tokens per domain (whole sequences of --seq-len).")]
BatchOpt = Annotated[int, typer.Option(min=1, help="Sequences per forward pass (one batch for MaxVio_batch, local balance loss and capacity).")]
SeqLenOpt = Annotated[int, typer.Option(min=2, help="Tokens per sequence.")]
DeviceArgOpt = Annotated[str, typer.Option(help="auto (cuda when available), cpu, cuda, cuda:N.")]
RunDtypeOpt = Annotated[str, typer.Option(help="bf16 or fp32; auto: bf16 on CUDA, fp32 on CPU.")]


def run_settings(device: str, dtype: str, seq_len: int, max_tokens: int):
    """Validated device and dtype (before any loading); under `accelerate launch` / `torchrun`
    each process takes its own GPU."""
    import torch

    from moekit.checkpoint.dtypes import parse_dtype
    from moekit.hf import resolve_device
    from moekit.profile import distributed_rank

    if max_tokens < seq_len:
        raise UsageError(f"--max-tokens {max_tokens} is less than one sequence (--seq-len {seq_len})")
    where = resolve_device(device)
    if where.type == "cuda" and distributed_rank()[1] > 1:
        where = resolve_device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        torch.cuda.set_device(where)
    return where, torch.bfloat16 if dtype == "auto" and where.type == "cuda" else parse_dtype("fp32" if dtype == "auto" else dtype)


@contextmanager
def batch_progress(label: str, enabled: bool):
    """A progress bar over batches (on stderr, when it is a terminal); yields the callback `count_routing` takes."""
    if not enabled or not err.is_terminal:
        yield None
        return
    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("batches"), TimeRemainingColumn(),
                   console=err, transient=True)
    with bar:
        task = bar.add_task(label, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@handle_errors
def profile_command(
    model: ModelArg,
    data: DataOpt = None,
    max_tokens: MaxTokensOpt = 65536,
    batch_size: BatchOpt = 8,
    seq_len: SeqLenOpt = 512,
    device: DeviceArgOpt = "auto",
    dtype: RunDtypeOpt = "auto",
    device_map: Annotated[Optional[str], typer.Option(help="auto: spread a model larger than one GPU over all GPUs (accelerate).", show_default=False)] = None,
    capacity_factors: Annotated[str, typer.Option(help="Capacity factors for drop rates, comma-separated.")] = "1.0,1.25,1.5,2.0",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every number as JSON to this file (- for stdout).", show_default=False)] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Write PNG figures into this folder: layer × expert load per domain, MaxVio per layer.", show_default=False)] = None,
    html_out: Annotated[Optional[Path], typer.Option("--html", help="Write one self-contained HTML report (figures embedded).", show_default=False)] = None,
    allow_pickle: PickleOpt = False,
) -> None:
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
    from moekit.checkpoint import open_checkpoint
    from moekit.checkpoint.dtypes import config_name
    from moekit.hf import load_model, load_tokenizer
    from moekit.architectures import MOE_CONFIG
    from moekit.profile import NOTHING_TO_PROFILE, distributed_rank, profile, read_domains

    try:
        factors = [float(f) for f in capacity_factors.split(",")]
    except ValueError:
        factors = []
    if not factors or not all(math.isfinite(f) and f > 0 for f in factors):
        raise UsageError(f"--capacity-factors takes positive numbers separated by commas, got {capacity_factors!r}")
    where, torch_dtype = run_settings(device, dtype, seq_len, max_tokens)
    config = open_checkpoint(model, allow_pickle=allow_pickle).config  # a dense model is refused before minutes of loading
    if config.get("model_type") not in MOE_CONFIG:
        raise MoekitError(NOTHING_TO_PROFILE)
    domains = read_domains(data or [], load_tokenizer(model), seq_len, batch_size, max_tokens)
    loaded, warnings = load_model(model, torch_dtype, where, device_map, allow_pickle=allow_pickle, complete=True)
    main_process = distributed_rank()[0] == 0
    with batch_progress("profiling", main_process and str(json_out) != "-") as progress:
        report = profile(loaded, domains, factors, progress)
    if not main_process:
        return
    report = {"model": model, "device": f"device_map={device_map}" if device_map else str(where),
              "dtype": config_name(torch_dtype), "batch_size": batch_size, "seq_len": seq_len, **report}
    for w in warnings:
        warn(w)
    publish(report, json_out, plot, html_out)


def publish(report: dict, json_out: Path | None, plot: Path | None, html_out: Path | None) -> None:
    """Tables on the terminal (unless JSON goes to stdout), then the requested files."""
    from moekit.profile_report import figures, html_page, sections, write_plots

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
