"""add-experts: old experts untouched, new ones appended, a manifest that matches, clean errors."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.checkpoint import open_checkpoint
from moekit.arch.targets import TARGETS
from tests.conftest import run_moekit
from tests.families import UNGROUPED
from tests.test_upcycle import load
from tests.tiny import with_char_tokenizer


def grow(src, out, *args):
    return json.loads(run_moekit("add-experts", str(src), str(out), *args, "--json", check=True).stdout)


def expert_weight(ckpt, target, layer, e, proj="down"):
    return TARGETS[target].experts.read(ckpt.load, layer, e, proj)


@pytest.mark.parametrize("family", UNGROUPED)
def test_new_experts_are_appended_and_old_ones_untouched(tiny_models, tmp_path, family):
    src, out = tiny_models(family), tmp_path / "grown"
    summary = grow(src, out, "-m", "2", "--copy-from", "1", "--drift-tokens", "256")
    t = TARGETS[family]
    cfg = json.loads((out / "config.json").read_text())
    assert all(cfg[f] == 6 for f in t.fields.expert_fields if f in cfg)
    load(out)  # stock transformers: no missing, unexpected or mismatched keys
    old, new = open_checkpoint(src), open_checkpoint(out)
    layer = int(next(iter(json.loads((out / "moekit.json").read_text())["freeze"]["moe_layers"])))
    for e in range(4):
        assert torch.equal(expert_weight(old, family, layer, e), expert_weight(new, family, layer, e))
    for e in (4, 5):  # copies of expert 1
        assert torch.equal(expert_weight(new, family, layer, e), expert_weight(old, family, layer, 1))
    router = new.load(t.router.format(i=layer))
    assert router.shape[0] == 6 and torch.equal(router[:4], old.load(t.router.format(i=layer)))
    assert 0 <= summary["drift"]["max_rel_error"] and summary["drift"]["tokens"] == 256


def test_freeze_manifest_matches_the_model(tiny_models, tmp_path):
    out = tmp_path / "grown"
    grow(tiny_models("qwen3_moe"), out, "-m", "3", "--init", "random", "--drift-tokens", "0")
    manifest = json.loads((out / "moekit.json").read_text())["freeze"]
    names = set(open_checkpoint(out).tensors)
    assert set(manifest["tensors"]) == names
    assert manifest["moe_layers"] == {str(i): {"old_experts": 4, "new_experts": 3} for i in range(2)}
    trainable = {n for n, rule in manifest["tensors"].items() if rule == "trainable"}
    assert trainable == {f"model.layers.{i}.mlp.experts.{e}.{p}_proj.weight"
                         for i in range(2) for e in (4, 5, 6) for p in ("gate", "up", "down")}
    assert manifest["tensors"]["model.layers.0.mlp.gate.weight"] == {"frozen_rows": [0, 4]}
    assert all(rule in ("frozen", "trainable") or set(rule) == {"frozen_rows"} for rule in manifest["tensors"].values())


@pytest.mark.parametrize("init", ["mean", "random", "drop-upcycling"])
def test_inits(tiny_models, tmp_path, init):
    src = tiny_models("mixtral")
    grow(src, tmp_path / "g", "-m", "1", "--init", init, "--copy-from", "0", "--drift-tokens", "0")
    old, new = open_checkpoint(src), open_checkpoint(tmp_path / "g")
    w = new.load("model.layers.0.block_sparse_moe.experts.4.w1.weight")
    olds = torch.stack([old.load(f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight") for e in range(4)])
    if init == "mean":
        assert torch.allclose(w, olds.mean(0))
    elif init == "random":
        assert not any(torch.allclose(w, o, atol=1e-3) for o in olds)
        assert w.std() == pytest.approx(olds.std().item(), rel=0.2)
    else:  # half of expert 0's neurons re-drawn
        assert (w != olds[0]).any(dim=1).float().mean().item() == pytest.approx(0.5, abs=0.02)


def test_most_used_from_calibration_and_kmeans_rows(tiny_models, tmp_path):
    src = with_char_tokenizer(tiny_models("glm4_moe"), tmp_path / "src")
    calib = tmp_path / "new.txt"
    calib.write_text("\n\n".join(f"Nouveau domaine {i}: les chats {i * 3} et les chiens." for i in range(60)))
    grow(src, tmp_path / "g", "-m", "2", "--copy-from", "most-used", "--router-init", "kmeans",
         "--calibration", str(calib), "--calibration-tokens", "400", "--drift-tokens", "256")
    record = json.loads((tmp_path / "g" / "moekit.json").read_text())
    donors = record["layers"][0]["copied_from"]
    assert len(donors) == 2 and donors[0] != donors[1]
    new = open_checkpoint(tmp_path / "g")
    bias = new.load("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.shape == (6,) and bias.dtype == torch.float32
    rows = new.load("model.layers.1.mlp.gate.weight")[4:]
    assert not torch.allclose(rows[0], rows[1])


def test_profile_counts_choose_the_donors(tiny_models, tmp_path):
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"layers": [{"layer": i, "tokens_per_expert": [5, 50, 1, 9]} for i in range(2)]}))
    grow(tiny_models("mixtral"), tmp_path / "most", "-m", "2", "--profile", str(profile), "--drift-tokens", "0")
    grow(tiny_models("mixtral"), tmp_path / "least", "-m", "1", "--copy-from", "least-used", "--profile", str(profile),
         "--drift-tokens", "0")
    assert json.loads((tmp_path / "most" / "moekit.json").read_text())["layers"][0]["copied_from"] == [1, 3]
    assert json.loads((tmp_path / "least" / "moekit.json").read_text())["layers"][0]["copied_from"] == [2]


def test_dense_source_is_upcycled_first(tiny_models, tmp_path):
    summary = grow(tiny_models("llama"), tmp_path / "g", "-n", "4", "-m", "2", "--copy-from", "0", "--drift-tokens", "64")
    assert (summary["old_experts"], summary["experts"]) == (4, 6)
    assert summary["drift"]["max_rel_error"] <= 1e-5  # every expert is still the dense FFN


@pytest.mark.parametrize("args,code,message", [
    (["-m", "0"], 2, "at least 1"),
    (["-m", "1", "--layers", "0"], 2, "same number of experts"),
    # data-driven choices fall back to the built-in sample (tests/test_bad_input.py), which needs a tokenizer
    (["-m", "1", "--router-init", "kmeans", "--copy-from", "0"], 3, "no tokenizer"),
    (["-m", "1"], 3, "no tokenizer"),
    (["-m", "1", "--copy-from", "9"], 2, "experts 0-3"),
    (["-m", "1", "--copy-from", "0", "-k", "9"], 2, "between 1 and 5"),
])
def test_bad_options_fail_cleanly(tiny_models, tmp_path, args, code, message):
    proc = run_moekit("add-experts", str(tiny_models("mixtral")), str(tmp_path / "out"), *args)
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_unsupported_source(tiny_models, tmp_path):
    proc = run_moekit("add-experts", str(tiny_models("gpt_oss")), str(tmp_path / "out"), "-m", "1")
    assert proc.returncode == 3 and "MoE layouts moekit writes" in proc.stderr
    proc = run_moekit("add-experts", str(tiny_models("deepseek_v3")), str(tmp_path / "out"), "-m", "2")
    assert proc.returncode == 2 and "group-limited" in proc.stderr


def test_counts_from_a_real_profile_report(tiny_models, tmp_path):
    src = with_char_tokenizer(tiny_models("qwen3_moe"), tmp_path / "src")
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"sample {i}: {'abc ' * (i % 7)} {i * 13}" for i in range(80)))
    run_moekit("profile", str(src), "--data", str(text), "--max-tokens", "256", "--seq-len", "32", "--device", "cpu",
               "--json", str(tmp_path / "p.json"), check=True)
    report = json.loads((tmp_path / "p.json").read_text())
    grow(src, tmp_path / "g", "-m", "1", "--profile", str(tmp_path / "p.json"), "--drift-tokens", "0")
    counts = next(r["tokens_per_expert"] for r in report["layers"] if r["layer"] == 0)
    donor = json.loads((tmp_path / "g" / "moekit.json").read_text())["layers"][0]["copied_from"][0]
    assert counts[donor] == max(counts)


def test_kmeans_rows_compete_with_the_old_rows_on_equal_terms(tiny_models, tmp_path):
    """New k-means rows score, on average over the new domain, what the old rows score."""
    from moekit.runtime.capture import calibration_mlp_inputs

    src = with_char_tokenizer(tiny_models("mixtral"), tmp_path / "src")
    calib = tmp_path / "new.txt"
    calib.write_text("\n\n".join(f"{i} zz qq {'xy' * (i % 5)}" for i in range(60)))
    grow(src, tmp_path / "g", "-m", "2", "--copy-from", "0", "--router-init", "kmeans", "--calibration", str(calib),
         "--calibration-tokens", "400", "--drift-tokens", "0")
    rows = open_checkpoint(tmp_path / "g").load("model.layers.0.block_sparse_moe.gate.weight")
    x = calibration_mlp_inputs(src, [0], calib, 400, "cpu")[0]
    old_mean, new_means = (x @ rows[:4].T).mean(), (x @ rows[4:].T).mean(0)
    assert torch.allclose(new_means, old_mean.expand(2), atol=1e-4)
    assert not torch.allclose(rows[4], rows[5])
