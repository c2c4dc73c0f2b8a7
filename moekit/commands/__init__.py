"""Thin Typer commands: parse options, call the library, report. One module per command."""
