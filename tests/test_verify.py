from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from moekit.commands.verify import verify_command
from moekit.runtime.models import load_model
from moekit.jobs.verify import compare_models, make_inputs, vocab_size
from tests import tiny
from tests.tiny import with_char_tokenizer
from tests.conftest import run_moekit

FAST = ["--tokens", "48", "--seq-len", "16", "--batch", "2"]  # 3 sequences: tiny models, sub-second runs


def verify(*args: str):
    """`moekit verify ARGS` through Typer (the command is not registered in moekit.cli yet)."""
    app = typer.Typer(pretty_exceptions_enable=False)
    app.command()(verify_command)
    return CliRunner().invoke(app, [*map(str, args)])


def edited_copy(src: Path, dst: Path, config: dict | None = None, edit=None) -> Path:
    """A copy of a tiny model folder with config fields replaced and/or its weights edited."""
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    if edit:
        weights = load_file(dst / "model.safetensors")
        edit(weights)
        save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def as_mixtral(dense: Path, dst: Path, experts: int = 4) -> Path:
    """The dense llama as a Mixtral whose experts are all its FFN, written in the per-expert Hub
    format: routing weights sum to 1, so the logits must equal the parent's whatever the router."""
    cfg = json.loads((dense / "config.json").read_text())
    # Mixtral's default theta is 1e6: carry the parent's, under the 4.x name (5.x keeps rope_parameters)
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=experts,
               num_experts_per_tok=2, rope_theta=theta)

    def upcycle(w: dict) -> None:
        for i in range(cfg["num_hidden_layers"]):
            dense_ffn = {new: w.pop(f"model.layers.{i}.mlp.{old}.weight")
                         for old, new in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))}
            moe = f"model.layers.{i}.block_sparse_moe"
            w[f"{moe}.gate.weight"] = torch.randn(experts, cfg["hidden_size"])
            for e in range(experts):
                w.update({f"{moe}.experts.{e}.{name}.weight": t.clone() for name, t in dense_ffn.items()})

    edited_copy(dense, dst, edit=upcycle)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("model_type", ["llama", "mixtral", "qwen3_moe"])
def test_identical_models_match_exactly(tiny_models, model_type):
    model, warnings = load_model(tiny_models(model_type), device="cpu")
    same, _ = load_model(tiny_models(model_type), device="cpu")
    r = compare_models(model, same, make_inputs(vocab_size(model), tokens=40, batch=2, seq_len=16))
    assert warnings == []
    assert r["max_rel_error"] == r["max_abs_error"] == r["mean_abs_error"] == r["kl_per_token"] == 0
    assert r["top1_agreement"] == 1 and r["tokens"] == 40 and r["sequences"] == 3 and r["max_abs_logit"] > 0


def test_make_inputs_is_seeded_and_batched():
    batches = make_inputs(50, tokens=40, batch=2, seq_len=16, seed=3)
    assert [tuple(b.shape) for b in batches] == [(2, 16), (1, 8)]  # the 8-token tail forms its own batch
    assert all(b.dtype == torch.long and b.max() < 50 for b in batches)
    assert torch.equal(torch.cat([b.flatten() for b in batches]),
                       torch.cat([b.flatten() for b in make_inputs(50, tokens=40, batch=2, seq_len=16, seed=3)]))
    assert not torch.equal(batches[0], make_inputs(50, tokens=40, batch=2, seq_len=16, seed=4)[0])


def test_cli_identical_passes(tiny_models):
    path = tiny_models("llama")
    result = verify(path, path, *FAST)
    assert result.exit_code == 0, result.output
    assert "PASS" in result.stderr and "max relative error" in result.stdout
    r = json.loads(verify(path, path, *FAST, "--json").stdout)
    assert r["passed"] and r["max_rel_error"] == 0 and r["tokens"] == 48 and r["child_type"] == "llama"


def test_one_perturbed_weight_fails(tiny_models, tmp_path):
    def nudge(w):
        w["model.layers.1.mlp.down_proj.weight"][3, 5] += 0.05

    child = edited_copy(tiny_models("llama"), tmp_path / "nudged", edit=nudge)
    result = verify(tiny_models("llama"), child, *FAST, "--json")
    r = json.loads(result.stdout)
    assert result.exit_code == 1 and "FAIL" in result.stderr
    assert 1e-5 < r["max_rel_error"] < 0.1 and not r["passed"]
    assert verify(tiny_models("llama"), child, *FAST, "--tolerance", "0.1").exit_code == 0


def test_nan_logits_fail(tiny_models, tmp_path):
    def poison(w):
        w["model.layers.0.self_attn.o_proj.weight"][0, 0] = float("nan")

    child = edited_copy(tiny_models("llama"), tmp_path / "nan", edit=poison)
    result = verify(tiny_models("llama"), child, *FAST, "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["max_rel_error"] is None  # JSON has no inf


@pytest.mark.parametrize("kind", ["converted", "mistral", "mixtral"])
def test_function_equal_copies_pass(tiny_models, tmp_path, kind):
    parent = tiny_models("llama")
    if kind == "converted":
        child = tmp_path / "converted"
        run_moekit("convert", str(parent), str(child), "--max-shard-size", "100KB", check=True)
    elif kind == "mistral":  # same weights, another architecture class
        child = edited_copy(parent, tmp_path / "mistral", {"model_type": "mistral", "architectures": ["MistralForCausalLM"],
                                                           "sliding_window": None})
    else:  # dense -> MoE
        child = as_mixtral(parent, tmp_path / "mixtral")
    result = verify(parent, child, *FAST, "--json")
    r = json.loads(result.stdout)
    assert result.exit_code == 0, result.output
    assert r["max_rel_error"] < 1e-5 and r["top1_agreement"] == 1 and r["warnings"] == []


def test_unrelated_moe_pair_runs_and_fails(tiny_models):
    result = verify(tiny_models("mixtral"), tiny_models("qwen3_moe"), *FAST, "--json")
    r = json.loads(result.stdout)
    assert result.exit_code == 1 and r["max_rel_error"] > 0.01 and r["kl_per_token"] > 0
    assert (r["parent_type"], r["child_type"]) == ("mixtral", "qwen3_moe")


def test_missing_weight_is_reported(tiny_models, tmp_path):
    child = edited_copy(tiny_models("llama"), tmp_path / "holed",
                        edit=lambda w: w.pop("model.layers.0.mlp.up_proj.weight"))
    result = verify(tiny_models("llama"), child, *FAST, "--json")
    assert result.exit_code == 1
    assert "1 weight(s) missing from the checkpoint" in result.stderr
    assert "model.layers.0.mlp.up_proj.weight" in json.loads(result.stdout)["warnings"][0]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_data_file(tiny_models, tmp_path, suffix):
    from transformers import AutoTokenizer

    parent = with_char_tokenizer(tiny_models("llama"), tmp_path / "parent")
    docs = ["The quick brown fox jumps over the lazy dog.", "Mixture of experts, exactly.\n"]
    data = tmp_path / f"data{suffix}"
    data.write_text("\n".join(json.dumps({"text": d}) for d in docs) if suffix == ".jsonl" else "".join(docs))
    result = verify(parent, parent, "--data", data, "--tokens", "1000", "--seq-len", "16", "--json")
    assert result.exit_code == 0, result.output
    r = json.loads(result.stdout)
    chars = sum(map(len, docs))
    assert r["tokens"] == (chars + 2 if suffix == ".jsonl" else chars)  # char tokens, + EOS after each document
    assert r["inputs"] == str(data)
    ids = torch.cat([b.flatten() for b in make_inputs(128, tokens=10, data=data, tokenizer=AutoTokenizer.from_pretrained(parent))])
    assert ids.tolist() == AutoTokenizer.from_pretrained(parent)(docs[0][:10])["input_ids"]


def bad_inputs(tiny_models, tmp_path) -> dict[str, tuple[list, str]]:
    llama = tiny_models("llama")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"content": "no text field"}\n')
    with_tok = with_char_tokenizer(llama, tmp_path / "with_tok")
    (tmp_path / "text.txt").write_text("~~~ ids up to 98 ~~~")
    small_vocab = tiny.build("llama", tmp_path / "small_vocab", vocab_size=64)
    return {
        "missing parent": ([tmp_path / "nope", llama], "no such file or folder"),
        "missing child": ([llama, tmp_path / "nope"], "no such file or folder"),
        "missing data": ([llama, llama, "--data", tmp_path / "nope.txt"], "nope.txt: no such file"),
        "not a model": ([tmp_path, llama], "not a model folder"),
        "empty data": ([with_tok, with_tok, "--data", tmp_path / "empty.txt"], "no text to compare on"),
        "jsonl without text": ([with_tok, with_tok, "--data", tmp_path / "bad.jsonl"], 'bad.jsonl:1: expected an object with a "text"'),
        "no tokenizer": ([llama, llama, "--data", tmp_path / "text.txt"], "no tokenizer"),
        "vocab mismatch": ([with_tok, small_vocab, "--data", tmp_path / "text.txt"], "do not share PARENT's vocabulary"),
        "bad device": ([llama, llama, "--device", "tpu9"], "unknown device"),
        **({} if torch.cuda.is_available() else {"absent cuda": ([llama, llama, "--device", "cuda"], "no CUDA device")}),
    }


def test_bad_input_is_one_line_exit_3(tiny_models, tmp_path):
    for name, (args, message) in bad_inputs(tiny_models, tmp_path).items():
        result = verify(*args, *FAST)
        assert result.exit_code == 3, (name, result.output)
        assert result.stdout == "" and message in result.stderr, (name, result.stderr)
        assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, (name, result.stderr)
