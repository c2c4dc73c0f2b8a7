"""moekit balance: loss-free bias calibration of sigmoid routers, written into a checkpoint copy."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from moekit.jobs.balance import calibrate_bias
from moekit.commands.balance import balance_command
from moekit.runtime.models import load_model
from moekit.jobs.profile import Domain, find_moe_layers, profile
from tests import tiny
from tests.tiny import with_char_tokenizer

BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"


def balance_app(*args):
    """`moekit balance ARGS` through Typer (registered in moekit.cli by the lead)."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(balance_command)
    return CliRunner().invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def glm(tmp_path_factory):
    """A tiny GLM-4.5 (sigmoid router, correction bias) with 8 experts, top-2, and a tokenizer."""
    root = tmp_path_factory.mktemp("balance")
    model = tiny.build("glm4_moe", root / "raw", n_routed_experts=8, n_group=1, topk_group=1)
    return with_char_tokenizer(model, root / "glm")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: {'code = [x * %d for x in range(9)]' % i if i % 3 else 'plain words here.'}"
                                for i in range(300)))
    return path


def test_one_step_moves_each_bias_towards_balance(glm):
    model, _ = load_model(glm, device="cpu")
    batch = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(0))
    counts = torch.tensor(profile(model, [Domain("x", [batch])])["layers"][0]["tokens_per_expert"], dtype=torch.float64)
    biases = calibrate_bias(model, find_moe_layers(model), [batch], steps=1, rate=0.1)
    assert biases[BIAS].dtype == torch.float32
    assert torch.equal(biases[BIAS], (0.1 * torch.sign(counts.mean() - counts)).float())  # starved up, overloaded down
    assert model.model.layers[1].mlp.gate.e_score_correction_bias is not None  # the model routes with it now


def test_balance_lowers_maxvio_and_changes_only_the_bias(glm, text, tmp_path):
    out = tmp_path / "balanced"
    r = balance_app(glm, out, "--data", text, "--steps", 300, "--rate", 1e-3, "--seq-len", 32, "--batch-size", 4,
                    "--max-tokens", 8192, "--device", "cpu", "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["maxvio_global_after"] < 0.7 * report["maxvio_global_before"], report
    assert report["held_out_tokens"] > 0 and report["steps"] == 300
    before, after = load_file(glm / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    assert after[BIAS].dtype == torch.float32 and after[BIAS].abs().sum() > 0
    assert all(torch.equal(before[k], after[k]) for k in before if k != BIAS)
    assert (out / "tokenizer.json").is_file() and json.loads((out / "moekit.json").read_text())["operation"] == "balance"
    reloaded, warnings = load_model(out, device="cpu")  # stock transformers routes with the calibrated bias
    assert warnings == []
    assert torch.equal(reloaded.model.layers[1].mlp.gate.e_score_correction_bias.float(), after[BIAS])


def test_balance_refuses_what_it_cannot_balance(glm, text, tmp_path):
    mixtral = tiny.build("mixtral", tmp_path / "mixtral")
    dense = tiny.build("llama", tmp_path / "llama")
    (tmp_path / "exists").mkdir()
    cases = [
        ((mixtral, tmp_path / "o1"), "only sigmoid routers have (glm4_moe, deepseek_v3, dots1); mixtral routes by softmax"),
        ((dense, tmp_path / "o2"), "nothing to balance"),
        ((glm, tmp_path / "exists"), "already exists"),
    ]
    for args, message in cases:
        r = balance_app(*args, "--data", text, "--device", "cpu")
        assert r.exit_code == 3, r.stderr
        assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
