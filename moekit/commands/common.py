"""What every command shares: consoles, the error boundary, progress, and the flags generated from a verb's options."""

from __future__ import annotations

import errno
import inspect
import json
import os
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Literal, Optional, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from moekit.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_IO, MoekitError, one_line
from moekit.options import cli_fields, flag_names, load_options, position

out = Console()  # results and JSON: stdout, so they can be piped
err = Console(stderr=True)  # progress, warnings, errors

RECIPE_HELP = "YAML recipe with any of these options (flags given here override it)."


def command(model: type[BaseModel]):
    """A verb's Typer command: its arguments and flags generated from `model`'s fields (each flag
    `None` when not given, so a --recipe's value stands), merged with --recipe into one `model`
    that the decorated body gets; every failure is one line and an exit code (`errors_as_exits`)."""

    def make(body: Callable[[BaseModel], None]):
        def run(recipe=None, **flags):
            with errors_as_exits():
                given = {k: list(v) if isinstance(v, tuple) else v for k, v in flags.items() if v not in (None, (), [])}
                return run.body(load_options(model, recipe, given))

        fields = cli_fields(model)
        arguments = sorted((n for n, f in fields.items() if position(f) is not None), key=lambda n: position(fields[n]))
        params = [typer_parameter(n, fields[n]) for n in arguments + [n for n in fields if n not in arguments]]
        recipe = Annotated[Optional[Path], typer.Option("--recipe", help=RECIPE_HELP, show_default=False)]
        params.append(inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=recipe))
        run.__signature__ = inspect.Signature(params)
        run.__name__, run.__qualname__, run.__doc__ = body.__name__, body.__qualname__, body.__doc__
        run.options, run.body = model, body  # for tests: which model, and the body to call
        return run

    return make


def typer_parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    """A field as a Typer argument or option: the field's type, its help with its default."""
    kind = Optional[flag_type(field)]
    if position(field) is not None:
        info = typer.Argument(help=field.description, show_default=False)
    else:
        info = typer.Option(*flag_names(name, field), help=help_with_default(field), show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind, info])


def flag_type(field: FieldInfo) -> type:
    """What click parses: the field's type without None, a Literal's values as strings, lists element-wise."""
    def plain(t):
        if get_origin(t) in (Union, types.UnionType):
            (t,) = [a for a in get_args(t) if a is not type(None)]
        if get_origin(t) is Literal:
            return type(get_args(t)[0])
        if get_origin(t) is list:
            return list[plain(get_args(t)[0])]
        return t

    return plain((field.json_schema_extra or {}).get("flag_type") or field.annotation)


def help_with_default(field: FieldInfo) -> str:
    shown = (field.json_schema_extra or {}).get("shown")
    if field.is_required():
        return f"{field.description} [required]"
    if shown is None and (field.default is None or field.default is False or field.default == []):
        return field.description
    return f"{field.description} [default: {field.default if shown is None else shown}]"


def fail(message: str, code: int, hint: str | None = None) -> typer.Exit:
    """Print the one `error:` line (and for usage errors one hint line); the exit to raise."""
    err.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
    if hint:
        err.print(f"[dim]hint:[/] {escape(one_line(hint))}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


@contextmanager
def errors_as_exits():
    """Turn every failure into one readable line and a meaningful exit code (see README)."""
    try:
        yield
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
        raise fail(f"internal error: {type(e).__name__}: {e} (MOEKIT_DEBUG=1 shows the traceback)",
                   EXIT_INTERNAL) from None


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


def written(result) -> dict:
    """What every command that writes a checkpoint reports of it, under the same keys."""
    return {"output": str(result.path), "bytes": result.bytes_written, "shards": result.shards,
            "seconds": round(result.seconds, 2), "mb_per_s": round(result.mb_per_s, 1)}


def run_surgery(label: str, job, opts, describe) -> None:
    """What the writing commands share after parsing: `job(opts, progress)` under a progress bar,
    its warnings, then its summary as JSON on stdout or as the lines `describe(result, summary)` gives."""
    with byte_progress(label, not opts.json_output) as progress:
        result, summary = job(opts, progress)
    summary = {**summary, **written(result)}
    for w in result.warnings + ([summary["note"]] if "note" in summary else []):
        warn(w)
    if opts.json_output:
        print_json(summary)
    else:
        for line in describe(result, summary):
            err.print(line, soft_wrap=True)


def warn(message: str) -> None:
    """One `warning:` line on stderr (never wrapped: one message, one line)."""
    err.print(f"[yellow]warning:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)


def print_json(data) -> None:
    out.print_json(json.dumps(data, default=str))
