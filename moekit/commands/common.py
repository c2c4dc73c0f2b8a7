"""What every command shares: consoles, the error boundary, progress, and common options."""

from __future__ import annotations

import errno
import functools
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from moekit.data import FORMATS as TEXT_FORMATS
from moekit.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_IO, EXIT_USAGE, MoekitError, one_line

out = Console()  # results and JSON: stdout, so they can be piped
err = Console(stderr=True)  # progress, warnings, errors

SourceArg = Annotated[str, typer.Argument(help="Model folder, .gguf file, or a built-in name (smollm2-135m).", show_default=False)]
OutputArg = Annotated[Path, typer.Argument(help="Output folder; must not exist (see --overwrite). Built in a hidden .OUTPUT.moekit-partial-PID folder beside it.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout instead of tables.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace OUTPUT if it exists (only once the new one is complete).")]
ShardOpt = Annotated[str, typer.Option("--max-shard-size", help="Largest safetensors shard, e.g. 5GB, 500MB.")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Read pytorch_model.bin (with torch.load(weights_only=True)).")]

# Options of the recipe-aware surgeries: None means "not given", so a recipe's value stands.
CalibrationOpt = Annotated[Optional[Path], typer.Option(help=f"Calibration text: {TEXT_FORMATS}. [default: built-in sample of real text]")]
CalibrationTokensOpt = Annotated[Optional[int], typer.Option(help="Tokens of calibration text to use. [default: 8192]")]
DtypeOpt = Annotated[Optional[str], typer.Option(help="float32, bfloat16, float16. [default: the source's; GGUF: float32]")]
MaxShardOpt = Annotated[Optional[str], typer.Option(help="Largest safetensors shard, e.g. 5GB, 500MB. [default: 5GB]")]
SeedOpt = Annotated[Optional[int], typer.Option(help="Seed of every random choice. [default: 0]")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="Device for forward passes on calibration text: auto, cpu, cuda. [default: auto]")]
RecipeOpt = Annotated[Optional[Path], typer.Option(help="YAML recipe with any of these options (flags given here override it).")]
MaybeOverwriteOpt = Annotated[Optional[bool], typer.Option("--overwrite", help="Replace OUTPUT once the new one is complete.")]


def fail(message: str, code: int, hint: str | None = None) -> typer.Exit:
    """Print the one `error:` line (and for usage errors one hint line); the exit to raise."""
    err.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[dim]hint:[/] {escape(one_line(hint))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(fn):
    """Turn every failure into one readable line and a meaningful exit code (see README)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        for name, value in kwargs.items():  # click's float ranges let nan through (nan < min is False)
            if isinstance(value, float) and not math.isfinite(value):
                raise fail(f"--{name.replace('_', '-')} must be a finite number, got {value}", EXIT_USAGE)
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except MoekitError as e:
            raise fail(str(e), e.exit_code) from None
        except KeyboardInterrupt:
            raise fail("interrupted; no output was left behind", EXIT_INTERRUPTED) from None
        except OSError as e:
            what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise fail(f"{e.filename or ''}: {what}; no output was left behind".lstrip(": "), EXIT_IO) from None
        except Exception as e:
            if os.environ.get("MOEKIT_DEBUG"):
                raise
            raise fail(f"internal error: {type(e).__name__}: {e} (MOEKIT_DEBUG=1 shows the traceback)", EXIT_INTERNAL) from None

    return wrapper


@contextmanager
def byte_progress(label: str, enabled: bool = True):
    """A progress bar over bytes written (on a terminal only: elsewhere a finished bar leaves an empty
    line); yields a callback for `pipeline.write_model`."""
    if not enabled or not err.is_terminal:
        yield None
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), TextColumn("[dim]{task.fields[tensor]}"), console=err, transient=True)
    with bar:
        task = bar.add_task(label, total=None, tensor="")

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, tensor=name)

        yield update


def run_surgery(label: str, job, opts, json_output: bool, describe) -> None:
    """What the writing commands share after parsing: `job(opts, progress)` under a progress bar,
    its warnings, then its summary as JSON on stdout or as the lines `describe(result, summary)` gives."""
    with byte_progress(label, not json_output) as progress:
        result, summary = job(opts, progress)
    for w in result.warnings + ([summary["note"]] if "note" in summary else []):
        warn(w)
    if json_output:
        print_json(summary)
    else:
        for line in describe(result, summary):
            err.print(line, soft_wrap=True)


def warn(message: str) -> None:
    """One `warning:` line on stderr (never wrapped: one message, one line)."""
    err.print(f"[yellow]warning:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


def print_json(data) -> None:
    out.print_json(json.dumps(data, default=str))
