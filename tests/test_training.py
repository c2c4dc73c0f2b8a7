"""train: after real optimiser steps every frozen tensor and frozen slice is bit-identical and every
trainable one moved (fused 5.x layout or per-expert 4.57 layout, whichever transformers runs);
the output loads in stock transformers with the source's names and config; KD, Switch and
loss-free balancing; clean one-line errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from moekit.checkpoint import open_checkpoint
from moekit.compat import for_both_lines
from moekit.training import kd_loss, switch_aux_loss
from tests.conftest import Run, run_moekit
from tests.test_upcycle import load
from tests.tiny import build, with_char_tokenizer

EXPERTS_FIELD = {"mixtral": "num_local_experts", "granitemoe": "num_local_experts", "glm4_moe": "n_routed_experts"}
TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, {i * 7} times." for i in range(60))


def train(*args) -> Run:
    return run_moekit("train", *map(str, args))


def manifest_for(names, old: int, layers: range) -> dict:
    """What add-experts writes for a model grown from `old` experts: new experts trainable, old
    router rows (and GraniteMoe's fused expert rows) frozen, everything else frozen."""
    def rule(name):
        if m := re.search(r"\.experts\.(\d+)\.", name):
            return "trainable" if int(m.group(1)) >= old else "frozen"
        if name.endswith((".gate.weight", ".router.layer.weight", "_linear.weight")):
            return {"frozen_rows": [0, old]}
        return "frozen"

    return {"format": 1, "moe_layers": {str(i): {"old_experts": old, "new_experts": 2} for i in layers},
            "tensors": {n: rule(n) for n in names}}


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """family -> a tiny 6-expert model whose moekit.json says experts 4 and 5 are new, with a tokenizer."""
    root, made = tmp_path_factory.mktemp("grown"), {}

    def get(family):
        if family not in made:
            src = build(family, root / f"{family}-raw", **{EXPERTS_FIELD.get(family, "num_experts"): 6})
            folder = with_char_tokenizer(src, root / family)
            layers = range(1, 2) if family == "glm4_moe" else range(2)  # glm: first_k_dense_replace=1
            manifest = manifest_for(open_checkpoint(folder).tensors, 4, layers)
            (folder / "moekit.json").write_text(json.dumps({"operation": "add-experts", "freeze": manifest}))
            made[family] = folder
        return made[family]

    return get


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "new.txt"
    path.write_text(TEXT)
    return path


FAST = ("--steps", "3", "--lr", "1e-2", "--batch-size", "4", "--seq-len", "32", "--log-every", "1")


def assert_frozen_exact(src, out, manifest, *, moving_buffers=()):
    before, after = open_checkpoint(src), open_checkpoint(out)
    assert set(after.tensors) == set(before.tensors)  # the source's per-expert names: 4.57 and 5.x load it
    for name, rule in manifest["tensors"].items():
        x, y = before.load(name), after.load(name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        if name in moving_buffers:
            continue
        if rule == "frozen":
            assert torch.equal(x, y), f"{name} is frozen but changed"
        elif rule == "trainable":
            assert not torch.equal(x, y), f"{name} is trainable but did not move"
        else:
            lo, hi = rule["frozen_rows"]
            assert torch.equal(x[lo:hi], y[lo:hi]), f"{name}: frozen rows changed"
            assert not torch.equal(x[hi:], y[hi:]), f"{name}: trainable rows did not move"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "granitemoe"])
def test_frozen_stays_bit_identical_and_trainable_moves(grown, text, tmp_path, family):
    src, out = grown(family), tmp_path / "out"
    aux = () if family == "glm4_moe" else ("--aux-loss-coef", "0.01")  # Glm4Moe 4.57 returns no router logits
    # weight decay on: AdamW's decoupled decay would move frozen rows if they were not restored
    r = train(src, out, "--data", text, *FAST, "--weight-decay", "0.1", "--kd-weight", "1", *aux, "--json")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((src / "moekit.json").read_text())["freeze"]
    biases = {n for n in manifest["tensors"] if n.endswith("e_score_correction_bias")}
    assert_frozen_exact(src, out, manifest, moving_buffers=biases)
    # the same config, its RoPE written in the forms both transformers lines read (moekit.compat)
    assert json.loads((out / "config.json").read_text()) == for_both_lines(json.loads((src / "config.json").read_text()))
    assert (out / "tokenizer.json").is_file()
    load(out)  # stock transformers: no missing, unexpected or mismatched keys
    record = json.loads((out / "moekit.json").read_text())
    assert record["operation"] == "train" and record["summary"]["steps"] == 3
    steps = [h for h in record["training_log"] if "loss" in h]
    assert len(steps) == 3 and all("kd_loss" in h and "maxvio_batch" in h for h in steps)
    assert all("aux_loss" in h for h in steps) == bool(aux)


def test_loss_free_bias_moves_by_u_per_step(grown, text, tmp_path):
    src, out = grown("glm4_moe"), tmp_path / "out"
    assert train(src, out, "--data", text, *FAST, "--bias-update-rate", "0.001").returncode == 0
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    before, after = open_checkpoint(src).load(name), open_checkpoint(out).load(name)
    steps = (after - before) / 1e-3  # each step adds u·sign(c̄ − c_i): an integer in [-3, 3] after 3 steps
    assert after.dtype == torch.float32 and steps.abs().max() > 0
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 3 + 1e-3
    assert train(src, tmp_path / "off", "--data", text, *FAST, "--bias-update-rate", "0").returncode == 0
    assert torch.equal(open_checkpoint(tmp_path / "off").load(name), before)


def test_freeze_none_trains_everything(grown, text, tmp_path):
    src, out = grown("qwen3_moe"), tmp_path / "out"
    assert train(src, out, "--data", text, *FAST, "--freeze", "none").returncode == 0
    before, after = open_checkpoint(src), open_checkpoint(out)
    assert all(not torch.equal(before.load(n), after.load(n)) for n in before.tensors)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "glm4_moe", "granitemoe"])
def test_replay_with_kd_on_real_add_experts_output(tiny_models, text, tmp_path, family):
    grown_dir = tmp_path / "grown"
    run_moekit("add-experts", str(with_char_tokenizer(tiny_models(family), tmp_path / "src")), str(grown_dir),
               "-m", "2", "--copy-from", "1", "--drift-tokens", "0", check=True)
    replay = tmp_path / "old.jsonl"
    replay.write_text("\n".join(json.dumps({"text": f"Old domain line {i}: lorem ipsum dolor sit amet."}) for i in range(80)))
    out = tmp_path / "out"
    r = train(grown_dir, out, "--data", text, "--replay", replay, "--kd-weight", "1", *FAST)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((grown_dir / "moekit.json").read_text())["freeze"]
    biases = {n for n in manifest["tensors"] if n.endswith("e_score_correction_bias")}  # loss-free update
    assert_frozen_exact(grown_dir, out, manifest, moving_buffers=biases)
    assert "rows of 32 tokens" in r.stderr and "kd_loss" in r.stderr


def test_parquet_data(grown, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "new.parquet"
    pq.write_table(pa.table({"text": TEXT.split("\n\n"), "id": list(range(60))}), data)
    assert train(grown("mixtral"), tmp_path / "out", "--data", data, *FAST).returncode == 0


def test_kd_and_switch_losses():
    logits = torch.randn(2, 5, 11)
    assert kd_loss(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 5, 11)
    p, q = other.log_softmax(-1), logits.log_softmax(-1)
    assert kd_loss(logits, other).item() == pytest.approx((p.exp() * (p - q)).sum(-1).mean().item(), rel=1e-5)
    assert kd_loss(logits, other, rows=torch.tensor([False, False])).item() == 0.0
    uniform = [torch.zeros(8, 4)] * 3  # equal probabilities; top-2 of ties still fill 2 slots per token
    balanced = torch.eye(4).repeat(2, 1) * 10  # each expert first choice of 2 tokens
    assert switch_aux_loss([balanced], 1).item() == pytest.approx(1.0, abs=1e-3)
    assert switch_aux_loss(uniform, 2).item() >= 1.0 - 1e-6
    skewed = torch.tensor([[10.0, 0, 0, 0]]).repeat(8, 1)
    assert switch_aux_loss([skewed], 1).item() > 3.5  # everything on one expert: → N


def one_line_error(r: Run, code: int, *words: str) -> None:
    assert r.returncode == code, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_manifest_that_does_not_match_is_one_line(grown, text, tmp_path):
    src = grown("qwen3_moe")
    manifest = json.loads((src / "moekit.json").read_text())["freeze"]
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({**manifest, "tensors": {**manifest["tensors"], "model.layers.0.mlp.experts.9.up_proj.weight": "trainable"}}))
    one_line_error(train(src, tmp_path / "o1", "--data", text, "--freeze", extra, *FAST), 3, "does not have", "experts.9")
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({**manifest, "tensors": dict(list(manifest["tensors"].items())[1:])}))
    one_line_error(train(src, tmp_path / "o2", "--data", text, "--freeze", missing, *FAST), 3, "does not list")
    counts = tmp_path / "counts.json"
    counts.write_text(json.dumps({**manifest, "moe_layers": {"0": {"old_experts": 4, "new_experts": 3}}}))
    one_line_error(train(src, tmp_path / "o3", "--data", text, "--freeze", counts, *FAST), 3, "config says 6")
    rows = tmp_path / "rows.json"
    router = "model.layers.0.mlp.gate.weight"
    rows.write_text(json.dumps({**manifest, "tensors": {**manifest["tensors"], router: {"frozen_rows": [0, 3]}}}))
    one_line_error(train(src, tmp_path / "o4", "--data", text, "--freeze", rows, *FAST), 3, "4 old experts")
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in src.iterdir():
        if f.name != "moekit.json":
            (plain / f.name).write_bytes(f.read_bytes())
    one_line_error(train(plain, tmp_path / "o5", "--data", text, *FAST), 3, "--freeze none")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir() if p.is_dir() and p.name != "plain")


def test_data_errors_are_one_line(grown, tmp_path):
    src = grown("mixtral")
    one_line_error(train(src, tmp_path / "o", "--data", tmp_path / "nope.txt", *FAST), 3, "no such data file")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    one_line_error(train(src, tmp_path / "o", "--data", empty, *FAST), 3, "empty.txt")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    one_line_error(train(src, tmp_path / "o", "--data", short, *FAST), 3, "fewer than --seq-len")
    few = tmp_path / "few.txt"
    few.write_text("x" * 100)  # 101 tokens with the character tokenizer: 3 rows of 32, batch size 4
    one_line_error(train(src, tmp_path / "o", "--data", few, *FAST, "--json"), 3, "fewer than --batch-size 4")
    notext = tmp_path / "x.jsonl"
    notext.write_text('{"body": "hello"}\n')
    one_line_error(train(src, tmp_path / "o", "--data", notext, *FAST), 3, 'no "text" column')
    one_line_error(train(src, tmp_path / "o", "--data", short, "--freeze", "sometimes", *FAST), 2, "--freeze")
    assert not (tmp_path / "o").exists()
