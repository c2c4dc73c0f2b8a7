"""train: after real optimiser steps every frozen tensor and frozen slice is bit-identical and every
trainable one moved (fused 5.x layout or per-expert 4.57 layout, whichever transformers runs);
the output loads in stock transformers with the source's names and config; KD, Switch and
loss-free balancing; clean one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.arch.families import SIGMOID_BIASED
from moekit.checkpoint import open_checkpoint
from moekit.arch.compat import for_both_lines
from moekit.metrics import switch_aux_loss
from moekit.runtime.moe import RoutingCounter, find_moe_layers, moe_layers
from moekit.runtime.transformers_private import experts_functions, set_experts_implementation
from moekit.arch.targets import TARGETS
from moekit.training import kd_loss
from tests.conftest import Run, run_moekit
from tests.families import PER_ROUTING, READ, UNGROUPED, first_moe_layer
from tests.test_upcycle import load
from tests.tiny import build, with_char_tokenizer

TEXT = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog, {i * 7} times." for i in range(60))


def train(*args) -> Run:
    return run_moekit("train", *map(str, args))


def manifest_for(family, names, old: int, layers: range) -> dict:
    """What add-experts writes for a model grown from `old` experts: new experts trainable, old
    router rows (and GraniteMoe's fused expert rows) frozen, everything else frozen."""
    t = TARGETS[family]
    stacked = {name for i in layers for name in (t.router.format(i=i), *t.experts.row_tensors(i))}

    def rule(name):
        if name in stacked:
            return {"frozen_rows": [0, old]}
        e = t.experts.expert_of(name)
        return "trainable" if e is not None and e >= old else "frozen"

    return {"format": 1, "moe_layers": {str(i): {"old_experts": old, "new_experts": 2} for i in layers},
            "tensors": {n: rule(n) for n in names}}


@pytest.fixture(scope="module")
def grown(tmp_path_factory):
    """family -> a tiny 6-expert model whose moekit.json says experts 4 and 5 are new, with a tokenizer."""
    root, made = tmp_path_factory.mktemp("grown"), {}

    def get(family):
        if family not in made:
            src = build(family, root / f"{family}-raw", **{TARGETS[family].fields.expert_fields[0]: 6})
            folder = with_char_tokenizer(src, root / family)
            layers = range(first_moe_layer(family), 2)
            manifest = manifest_for(family, open_checkpoint(folder).tensors, 4, layers)
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


@pytest.mark.parametrize("family", UNGROUPED)
def test_frozen_stays_bit_identical_and_trainable_moves(grown, text, tmp_path, family):
    src, out = grown(family), tmp_path / "out"
    # sigmoid-routed classes (Glm4Moe, ...) return no router logits in 4.57
    aux = () if TARGETS[family].routing is SIGMOID_BIASED else ("--aux-loss-coef", "0.01")
    # weight decay on: AdamW's decoupled decay would move frozen rows if they were not restored
    r = train(src, out, "--data", text, *FAST, "--weight-decay", "0.1", "--kd-weight", "1", *aux, "--json")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((src / "moekit.json").read_text())["freeze"]
    biases = {n for n in manifest["tensors"] if n.endswith("e_score_correction_bias")}
    assert_frozen_exact(src, out, manifest, moving_buffers=biases)
    # the same config, its RoPE written in the forms both transformers lines read (moekit.arch.compat)
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


@pytest.mark.parametrize("family", PER_ROUTING)
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
    one_line_error(train(src, tmp_path / "o", "--data", notext, *FAST), 3, 'x.jsonl:1: expected an object with a "text"')
    one_line_error(train(src, tmp_path / "o", "--data", short, "--freeze", "sometimes", *FAST), 2, "--freeze")
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- continued pretraining


def random_rows(n: int, seq_len: int = 16, seed: int = 0) -> list[list[int]]:
    return torch.randint(3, 128, (n, seq_len), generator=torch.Generator().manual_seed(seed)).tolist()


CPT = dict(steps=6, lr=1e-2, lr_schedule="cosine", warmup_steps=2, batch_size=2, grad_accum=2, seq_len=16,
           weight_decay=0.1, eval_share=0.1, eval_every=2, log_every=1, device="cpu")


@pytest.mark.parametrize("family,extra", [("qwen3_moe", {"aux_loss_coef": 0.01, "z_loss_coef": 1e-3}),
                                          ("glm4_moe", {"bias_update": "adaptive"}),
                                          ("qwen3_moe", {"aux_loss_coef": 0.01, "weights": "bf16"})])
def test_stopped_and_resumed_equals_uninterrupted(tiny_models, tmp_path, family, extra):
    """Trainer's own resume drops renamed (fused) expert tensors (transformers issue 48805): stop
    after the step-3 checkpoint, resume, and the weights must equal a run that never stopped."""
    from moekit.training import TrainOptions, train_model

    src, rows = tiny_models(family), random_rows(48)
    opts = TrainOptions(**CPT, save_every=3, **extra)
    whole = train_model(src, tmp_path / "whole", rows, None, None, opts)

    def stop_at_4(logs):
        if logs.get("step") == 4 and "loss" in logs:
            raise KeyboardInterrupt  # as a user's Ctrl-C between the checkpoint and the end

    with pytest.raises(KeyboardInterrupt):
        train_model(src, tmp_path / "resumed", rows, None, None, opts, checkpoints=tmp_path / "ckpt", on_log=stop_at_4)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "ckpt" / "checkpoint-3").is_dir()
    resumed = train_model(src, tmp_path / "resumed", rows, None, None, opts, checkpoints=tmp_path / "ckpt", resume=True)
    assert resumed["resumed_from"].endswith("checkpoint-3") and resumed["steps"] == whole["steps"] == 6
    a, b = open_checkpoint(tmp_path / "whole"), open_checkpoint(tmp_path / "resumed")
    moved = [n for n in a.tensors if not torch.equal(a.load(n), open_checkpoint(src).load(n))]
    assert len(moved) > len(a.tensors) // 2  # training changed the model, so equality means something
    for name in a.tensors:
        assert torch.equal(a.load(name), b.load(name)), f"{name} differs after resume"
    curve_a = json.loads((tmp_path / "whole" / "training_curve.json").read_text())
    curve_b = json.loads((tmp_path / "resumed" / "training_curve.json").read_text())
    assert [e["step"] for e in curve_a["eval"]] == [0, 2, 4, 6] and curve_a["eval"] == curve_b["eval"]


def test_resume_with_other_weights_is_refused(tiny_models, tmp_path):
    from moekit.errors import UsageError
    from moekit.training import TrainOptions, train_model

    src, rows = tiny_models("qwen3_moe"), random_rows(48)
    opts = TrainOptions(**{**CPT, "steps": 3, "save_every": 3, "weights": "bf16"})
    train_model(src, tmp_path / "out", rows, None, None, opts)
    with pytest.raises(UsageError, match="written with --weights bf16; resume with --weights bf16, not fp32"):
        train_model(src, tmp_path / "again", rows, None, None, opts.model_copy(update={"weights": "fp32"}),
                    checkpoints=tmp_path / "out.checkpoints", resume=True)
    assert not (tmp_path / "again").exists()


def test_trainer_resume_alone_loses_fused_experts(tiny_models, tmp_path):
    """Why moekit saves its own checkpoints: save_pretrained + Trainer's non-strict load drop tensors."""
    import transformers

    pytest.importorskip("transformers.core_model_loading", reason="transformers 4.x keeps per-expert names at run time")
    from moekit.runtime.models import load_model

    model, _ = load_model(tiny_models("qwen3_moe"), torch.float32, "cpu")
    model.save_pretrained(tmp_path / "saved")
    from safetensors.torch import load_file

    result = model.load_state_dict(load_file(tmp_path / "saved" / "model.safetensors"), strict=False)
    assert any("experts" in k for k in result.missing_keys), transformers.__version__


def hand_balance(logits: torch.Tensor, counts: torch.Tensor) -> float:
    """N · Σ_i f_i · P_i written out: f from counts, P the mean softmax over this micro-batch."""
    probs = logits.softmax(-1).mean(0)
    f = counts / counts.sum()
    return float(logits.shape[-1] * sum(f[i] * probs[i] for i in range(logits.shape[-1])))


def routed(model, ids) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per MoE layer: the router logits of `ids`, and the top-k counts they imply (by hand)."""
    with torch.no_grad():
        logits = [l.float().reshape(-1, 4) for l in model(input_ids=ids, output_router_logits=True).router_logits]
    return logits, [torch.bincount(l.softmax(-1).topk(2, -1).indices.flatten(), minlength=4).float() for l in logits]


@pytest.mark.parametrize("balance", ["global", "micro"])
def test_balance_loss_over_two_micro_batches_by_hand(tiny_models, tmp_path, balance):
    """Qwen's global-batch loss: micro-batch 2 takes f from the counts of micro-batches 1 and 2
    together; the micro-batch loss from its own counts; P is always the micro-batch's own."""
    from transformers import TrainingArguments

    from moekit.arch.families import SOFTMAX_TOPK
    from moekit.runtime.models import load_model
    from moekit.training import LifelongTrainer, collate

    model, _ = load_model(tiny_models("qwen3_moe"), torch.float32, "cpu")
    counter = RoutingCounter(find_moe_layers(model), keep_logits=True)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=2)
    trainer = LifelongTrainer(model=model, args=args, train_dataset=[{"input_ids": [3] * 8}] * 2, data_collator=collate,
                              aux_loss_coef=1.0, balance=balance, routing=SOFTMAX_TOPK, counter=counter)
    # two micro-batches of different text, so that their loads differ
    one, two = torch.tensor(random_rows(2, 12, seed=1)), torch.tensor(random_rows(2, 12, seed=2)) // 4
    counter.reset()  # what on_step_begin does
    for ids in (one, two):
        trainer.compute_loss(model, {"input_ids": ids, "replay": torch.zeros(2, dtype=torch.bool)})
    got = [float(v) for v in trainer._terms["aux_loss"]]
    (l1, c1), (l2, c2) = routed(model, one), routed(model, two)
    want_one = sum(hand_balance(l, c) for l, c in zip(l1, c1)) / len(l1)
    second = [a + b for a, b in zip(c1, c2)] if balance == "global" else c2
    want_two = sum(hand_balance(l, c) for l, c in zip(l2, second)) / len(l2)
    assert got == pytest.approx([want_one, want_two], rel=1e-5)
    other = [a + b for a, b in zip(c1, c2)] if balance == "micro" else c2
    assert abs(want_two - sum(hand_balance(l, c) for l, c in zip(l2, other)) / len(l2)) > 1e-4  # the modes differ here


def test_switch_loss_selects_with_the_correction_bias(tiny_models):
    """A sigmoid router picks on score + e_score_correction_bias: the loss's f must be those picks
    (the ones RoutingCounter sees the experts get), not the top-k of the scores alone."""
    from moekit.arch.families import SIGMOID_BIASED
    from moekit.runtime.models import load_model
    from moekit.metrics import balance_loss

    model, _ = load_model(tiny_models("glm4_moe"), torch.float32, "cpu")
    moe = find_moe_layers(model)
    gate = moe.layers[0].router
    with torch.no_grad():
        gate.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # expert 3 always picked
    seen = {}
    gate.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    counter = RoutingCounter(moe)
    model(input_ids=torch.tensor(random_rows(2, 12)))
    logits = [torch.nn.functional.linear(seen["x"].reshape(-1, 64).float(), gate.weight.float())]
    chosen = list(counter.counts.values())
    assert chosen[0][3] == logits[0].shape[0]  # every token went to expert 3
    biased = switch_aux_loss(logits, 2, SIGMOID_BIASED, [gate.e_score_correction_bias])
    assert biased.item() == pytest.approx(balance_loss(logits, chosen, SIGMOID_BIASED).item(), rel=1e-6)
    assert abs(biased.item() - switch_aux_loss(logits, 2, SIGMOID_BIASED).item()) > 1e-3


@pytest.mark.parametrize("family", READ)
def test_moekit_experts_function_matches_transformers_eager(tiny_models, family):
    """moekit_grouped_mm (sorted grouped matmuls) computes what transformers' own eager experts loop
    computes, output and gradients, on fresh inputs in fp32 (CPU); a layout it does not take (GPT-OSS)
    falls back to transformers' grouped_mm and says so."""
    if experts_functions() is None:
        pytest.skip("transformers 4.x has one module per expert: no experts function to choose")
    from moekit.runtime.models import load_model
    from moekit.training import use_experts_implementation

    model, _ = load_model(tiny_models(family), torch.float32, "cpu")
    used = use_experts_implementation(model)
    experts = moe_layers(model)[0].experts
    if family == "gpt_oss":
        assert used.startswith("grouped_mm") and "in place of moekit_grouped_mm" in used
        return
    assert used.startswith("moekit_grouped_mm")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, model.config.hidden_size, generator=g, requires_grad=True)
    n = experts.gate_up_proj.shape[0]
    index = torch.stack([torch.randperm(n, generator=g)[:2] for _ in range(40)])  # K distinct experts per token
    weights = torch.rand(40, 2, generator=g)

    def run():
        out = experts(x, index, weights)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(),
                                    [x, experts.gate_up_proj, experts.down_proj])
        return [out.detach(), *grads]

    ours = run()
    set_experts_implementation(model, "eager")
    for a, b in zip(ours, run()):
        assert ((a - b).norm() / b.norm()).item() <= 1e-5


def test_gradient_checkpointing_counts_each_token_once(tiny_models):
    from moekit.runtime.models import load_model
    from moekit.training import enable_checkpointing

    model, _ = load_model(tiny_models("qwen3_moe"), torch.float32, "cpu")
    enable_checkpointing(model)
    model.train()
    counter = RoutingCounter(find_moe_layers(model))
    ids = torch.tensor(random_rows(2, 12))
    model(input_ids=ids, use_cache=False).logits.sum().backward()  # the backward recomputes each layer
    assert [float(c.sum()) for c in counter.counts.values()] == [2 * 12 * 2] * 2


def test_dense_continued_pretraining_with_eval_and_curve(tiny_models, text, tmp_path):
    """A dense parent trains too (the baseline of an upcycle); cosine schedule with its floor,
    held-out share, the curve as JSON and PNG beside the model."""
    src, out = with_char_tokenizer(tiny_models("llama"), tmp_path / "src"), tmp_path / "out"
    r = train(src, out, "--data", text, "--freeze", "none", *FAST[:-2], "--steps", "4", "--log-every", "1",
              "--lr-schedule", "cosine", "--min-lr-ratio", "0.1", "--eval-share", "0.1", "--eval-every", "2", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["first_eval_loss"] > summary["last_eval_loss"] and summary["experts"].startswith("none")
    curve = json.loads((out / "training_curve.json").read_text())
    assert [e["step"] for e in curve["eval"]] == [0, 2, 4]
    lrs = [h["learning_rate"] for h in curve["train"]]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and min(lrs) >= 1e-3 - 1e-9  # decays to 0.1 · 1e-2, not below
    assert (out / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_option_errors_are_one_line(grown, text, tmp_path):
    src = grown("qwen3_moe")
    one_line_error(train(src, tmp_path / "o", "--data", text, "--lr-schedule", "linear", *FAST), 2, "--lr-schedule")
    one_line_error(train(src, tmp_path / "o", "--data", text, "--balance", "local", *FAST), 2, "--balance")
    one_line_error(train(src, tmp_path / "o", "--data", text, "--resume", *FAST), 3, "no checkpoint")
    assert not (tmp_path / "o").exists()


def test_balance_losses_on_a_dense_model_are_refused(tiny_models, text, tmp_path):
    src = with_char_tokenizer(tiny_models("llama"), tmp_path / "src")
    r = train(src, tmp_path / "o", "--data", text, "--freeze", "none", "--z-loss-coef", "0.001", *FAST)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]  # after the data's progress line
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and "need an MoE model" in errors[0] and r.stderr.strip().endswith(errors[0])
    assert not (tmp_path / "o").exists()


def test_bf16_weights_with_a_freeze_manifest_are_refused(grown, text, tmp_path):
    r = train(grown("qwen3_moe"), tmp_path / "o", "--data", text, "--weights", "bf16", *FAST)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(errors) == 1 and "--weights fp32" in errors[0] and not (tmp_path / "o").exists()


def test_master_weights_step_in_fp32():
    """One AdamW step of lr 1e-4 moves every weight by lr·sign(grad): below half of bf16's spacing
    at |w| ~ 0.5 (2^-8), so the bf16 weights do not move, but the masters move by exactly that."""
    from moekit.training.precision import MasterWeights

    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        model.weight.copy_((0.5 + 0.01 * torch.randn(64, 64)).bfloat16())  # values bf16 holds exactly
    start = model.weight.detach().clone()
    masters = MasterWeights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    masters.attach(optimizer)
    assert model.weight.dtype == torch.bfloat16 and optimizer.param_groups[0]["params"][0].dtype == torch.float32
    model(torch.randn(8, 64, dtype=torch.bfloat16)).square().sum().backward()
    optimizer.step()
    master = optimizer.param_groups[0]["params"][0]
    grad = model.weight.grad.float()
    assert torch.allclose(start - master, 1e-4 * grad.sign(), atol=1e-7)
    assert torch.equal(model.weight, master.bfloat16())  # the bf16 weights are the masters rounded
    assert torch.equal(model.weight.float(), start)  # where a bf16 AdamW would have lost the step
    assert list(masters.state_dict()) == ["weight"] and masters.state_dict()["weight"] is master
    masters.load_state_dict({"weight": start + 1})  # as a resume does: the masters, then the weights
    assert torch.equal(master, start + 1) and torch.equal(model.weight.float(), (start + 1).bfloat16().float())
    masters.restore()
    assert model.weight.dtype == torch.float32 and torch.equal(model.weight, master)


def test_bf16_weights_train_and_write_fp32(tiny_models, tmp_path):
    """`--weights bf16` (on CPU here: bf16 throughout, no autocast): the loss falls and the output
    holds the fp32 masters, not their bf16 rounding."""
    from moekit.training import TrainOptions, train_model

    src = tiny_models("qwen3_moe")
    opts = TrainOptions(**{**CPT, "eval_share": 0.0, "weights": "bf16"})
    summary = train_model(src, tmp_path / "out", [list(range(3, 19))] * 48, None, None, opts)  # learnable
    assert summary["weights"].startswith("bf16") and summary["last_loss"] < summary["first_loss"]
    a, b = open_checkpoint(src), open_checkpoint(tmp_path / "out")
    trained = {n: b.load(n) for n in b.tensors if b.load(n).is_floating_point()}
    assert all(t.dtype == a.tensors[n].dtype == torch.float32 for n, t in trained.items())
    off_bf16 = [n for n, t in trained.items() if not torch.equal(t, t.bfloat16().float())]
    assert len(off_bf16) > len(trained) // 2


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_two_process_ddp_run_and_resume(grown, text, tmp_path, weights):
    """Under torchrun / accelerate launch (two CPU processes, gloo): routing counts, the global
    balance loss and the held-out loss are all-reduced; resuming from the step-2 checkpoint gives
    the weights of the run that went on, with fp32 weights and with bf16 ones (fp32 masters)."""
    import shutil
    import subprocess
    import sys

    src = grown("qwen3_moe")

    def ddp(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "moekit",
               "train", str(src), str(out), "--freeze", "none", "--data", str(text), "--steps", "4", "--batch-size", "2",
               "--grad-accum", "2", "--seq-len", "32", "--aux-loss-coef", "0.01", "--eval-share", "0.1",
               "--eval-every", "2", "--save-every", "2", "--checkpoint-dir", str(tmp_path / "ckpt"), "--device", "cpu",
               "--weights", weights, "--json", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    r = ddp(tmp_path / "whole")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["devices"] == "2 x cpu" and summary["tokens"] == 4 * 2 * 2 * 32 * 2
    assert summary["weights"].startswith(weights)
    shutil.rmtree(tmp_path / "ckpt" / "checkpoint-4")
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("transformers 4.x's Trainer loads the optimizer state with map_location='cpu:0' in CPU "
                    "multi-process runs, which torch.load refuses (GPU runs are not affected)")
    r = ddp(tmp_path / "resumed", "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = open_checkpoint(tmp_path / "whole"), open_checkpoint(tmp_path / "resumed")
    assert all(torch.equal(a.load(n), b.load(n)) for n in a.tensors)
