"""Each flag is written once, as a field of its verb's model in moekit/options.py: the CLI's
arguments and flags are generated from the fields, and a recipe holds the same fields."""

from __future__ import annotations

import pytest
import typer
import yaml

from moekit.cli import app
from moekit.options import flag_names, position
from tests.conftest import run_moekit

COMMANDS = {info.name: info.callback for info in app.registered_commands}
CLICK = typer.main.get_command(app).commands

# verb: (what it needs, a field with a default, its value in a recipe, a flag that overrides it, its value)
CASES = {
    "upcycle": ({"source": "src", "output": "out"}, "experts", 4, ["-n", "6"], 6),
    "split-granularity": ({"source": "src", "output": "out", "granularity": 2}, "partition", "random",
                          ["--partition", "kmeans"], "kmeans"),
    "add-experts": ({"source": "src", "output": "out", "new_experts": 1}, "copy_from", "least-used",
                    ["--copy-from", "3"], "3"),
    "prune": ({"source": "src", "output": "out"}, "method", "ean", ["--method", "random"], "random"),
    "convert": ({"source": "src", "output": "out"}, "max_shard_size", "1GB", ["--max-shard-size", "2GB"], "2GB"),
    "inspect": ({"source": "src"}, "json_output", True, ["--json"], True),
    "verify": ({"parent": "a", "child": "b"}, "tokens", 128, ["--tokens", "256"], 256),
    "train": ({"model": "m", "output": "out", "data": "d.txt", "freeze": "none"}, "steps", 5, ["--steps", "7"], 7),
    "profile": ({"model": "m"}, "max_tokens", 1024, ["--max-tokens", "2048"], 2048),
    "balance": ({"model": "m", "output": "out"}, "rate", 0.01, ["--rate", "0.02"], 0.02),
}


def test_every_verb_has_a_case():
    assert set(COMMANDS) == set(CASES)


@pytest.mark.parametrize("verb", CASES)
def test_generated_flags_are_the_model_fields(verb):
    model, params = COMMANDS[verb].options, {p.name: p for p in CLICK[verb].params}
    assert set(params) - {"help"} == set(model.model_fields) | {"recipe"}  # a field without a flag fails here
    for name, field in model.model_fields.items():
        param = params[name]
        if position(field) is not None:
            assert param.param_type_name == "argument", name
        else:
            assert sorted(param.opts) == sorted(flag_names(name, field)), name
            assert param.help.startswith(field.description), name
    arguments = [p.name for p in CLICK[verb].params if p.param_type_name == "argument"]
    assert arguments == sorted(arguments, key=lambda n: position(model.model_fields[n]))


@pytest.fixture
def parsed(monkeypatch):
    """verb -> the options its body got (the body itself does not run)."""
    got = {}
    for verb, callback in COMMANDS.items():
        monkeypatch.setattr(callback, "body", lambda opts, verb=verb: got.__setitem__(verb, opts))
    return got


def command_line(verb: str, values: dict) -> list[str]:
    model, argv = COMMANDS[verb].options, []
    for name, value in sorted(values.items(), key=lambda kv: position(model.model_fields[kv[0]]) is None):
        field = model.model_fields[name]
        argv += [str(value)] if position(field) is not None else [flag_names(name, field)[0], str(value)]
    return argv


@pytest.mark.parametrize("verb", CASES)
def test_a_recipe_overrides_defaults_and_flags_override_the_recipe(verb, parsed, tmp_path):
    needed, field, in_recipe, flag, from_flag = CASES[verb]
    default = COMMANDS[verb].options.model_fields[field].default
    assert default != in_recipe != from_flag or field == "json_output"
    run_moekit(verb, *command_line(verb, needed), check=True)
    assert getattr(parsed.pop(verb), field) == default
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**needed, field: in_recipe}))
    run_moekit(verb, "--recipe", str(recipe), check=True)
    assert getattr(parsed.pop(verb), field) == in_recipe
    run_moekit(verb, "--recipe", str(recipe), *flag, check=True)
    assert getattr(parsed.pop(verb), field) == from_flag


@pytest.mark.parametrize("verb", CASES)
def test_arguments_on_the_command_line_override_the_recipe(verb, parsed, tmp_path):
    needed = CASES[verb][0]
    first = next(n for n, f in COMMANDS[verb].options.model_fields.items() if position(f) == 0)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(needed))
    run_moekit(verb, "--recipe", str(recipe), "from-the-command-line", check=True)
    assert getattr(parsed[verb], first) == "from-the-command-line"


@pytest.mark.parametrize("verb", CASES)
def test_help_lists_every_flag_and_teaches_with_examples(verb, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    text = run_moekit(verb, "--help", check=True).stdout
    assert "Examples:" in text and f"moekit {verb} " in text
    model = COMMANDS[verb].options
    for name, field in model.model_fields.items():
        if position(field) is None:
            assert all(flag in text for flag in flag_names(name, field)), name
    assert "--recipe" in text


def test_a_bad_flag_names_the_flag_and_a_bad_recipe_value_names_the_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    from_flag = run_moekit("verify", "a", "b", "--tokens", "0")
    assert from_flag.returncode == 2 and from_flag.stderr.startswith("error: --tokens:")
    recipe.write_text("parent: a\nchild: b\ntokens: 0\n")
    in_recipe = run_moekit("verify", "--recipe", str(recipe))
    assert in_recipe.returncode == 2 and in_recipe.stderr.startswith("error: tokens:")
    assert str(recipe) in in_recipe.stderr
