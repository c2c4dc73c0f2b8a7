"""prune keeps what the router uses exactly, scores experts as documented, loads in both
transformers lines, copies kept tensors as byte ranges, and fails cleanly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moekit.arch.families import SOFTMAX_TOPK
from moekit.arch.layouts import PROJS
from moekit.arch.targets import TARGETS
from tests import tiny
from tests.conftest import run_moekit
from tests.families import READ
from tests.test_upcycle import load, max_rel_error

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
FAMILIES = READ  # every MoE layout moekit reads
N, KEEP, REMOVED = 8, 4, (1, 2, 5, 6)  # two from each half: DeepSeek-V3's two groups keep two each
# Scores that read expert outputs need 5.x's fused experts; 4.57 scores by routing counts.
METHOD = "reap" if TRANSFORMERS_5 else "frequency"


def build(family, path, **overrides):
    """A tiny model of `family` with N experts, renormalised top-k where the family has the flag."""
    t = TARGETS[family]
    renorm = {"norm_topk_prob": True} if t.routing is SOFTMAX_TOPK else {}
    return tiny.build(family, path, **{t.fields.expert_fields[0]: N, **renorm, **overrides})


def never_routed(src, family, removed=REMOVED, big=1000.0):
    """Make `removed` experts unselectable: hidden dimension 0 carries a constant from the
    embedding, so it is positive at every MoE input; their router rows weigh it by -big, the
    others by 0 (so that their choice still depends on the token)."""
    t = TARGETS[family]
    file = src / "model.safetensors"
    state = load_file(file)
    state["model.embed_tokens.weight"] *= 100  # token identity dominates what attention (and post-norms) add
    state["model.embed_tokens.weight"][:, 0] = 40.0
    for i in range(tiny.COMMON["num_hidden_layers"]):
        router = t.router.format(i=i)
        if router in state:
            state[router][:, 0] = 0.0
            state[router][list(removed), 0] = -big
    save_file(state, file, metadata={"format": "pt"})
    return src


def prune(src, out, *args):
    return run_moekit("prune", str(src), str(out), *args)


def calibration_file(tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"line {i}: {'abc ' * (i % 5)}{i * 37} the quick brown fox; x = {i % 7}" for i in range(80)))
    return text


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_experts_never_routed_is_exact_and_native(tmp_path, family):
    src = never_routed(tiny.with_char_tokenizer(build(family, tmp_path / "raw"), tmp_path / "src"), family)
    out = tmp_path / "pruned"
    proc = prune(src, out, "--keep", str(KEEP), "--method", METHOD, "--calibration", str(calibration_file(tmp_path)),
                 "--calibration-tokens", "2000")
    assert proc.returncode == 0, proc.stderr
    assert "without renormalisation" not in proc.stderr  # renormalised: the surviving weights do not change
    cfg, t = json.loads((out / "config.json").read_text()), TARGETS[family]
    assert all(cfg[f] == KEEP for f in t.fields.expert_fields) and cfg["num_experts_per_tok"] == 2
    record = json.loads((out / "moekit.json").read_text())
    for layer in record["layers"]:
        assert layer["removed"] == list(REMOVED)
        assert [layer["scores"]["frequency"][e] for e in REMOVED] == [0] * len(REMOVED)  # never routed on calibration
        assert all(layer["scores"]["frequency"][e] > 0 for e in layer["kept"])  # the others all were
        assert layer["new_ids"] == {str(e): j for j, e in enumerate(e for e in range(N) if e not in REMOVED)}
    assert max_rel_error(src, out, 128, seed=len(family)) <= 1e-5  # `load` asserts no missing/unexpected keys


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_experts_and_router_rows_are_the_source_ones(tmp_path, family):
    """Random choice (no forward pass): kept expert e is new expert j, byte for byte; router rows
    and selection biases sliced; shared experts untouched; loads with no key problems."""
    from moekit.checkpoint import open_checkpoint
    from moekit.surgery.layout import ExpertReader
    from moekit.surgery.requirements import moe_layer_indices

    src, out = build(family, tmp_path / "src"), tmp_path / "pruned"
    assert prune(src, out, "--ratio", "0.25", "--method", "random", "--seed", "3").returncode == 0
    t = TARGETS[family]
    a, b = open_checkpoint(src), open_checkpoint(out)
    old, new = ExpertReader(a, t, N), ExpertReader(b, t, 6)
    layers = json.loads((out / "moekit.json").read_text())["layers"]
    assert [r["layer"] for r in layers] == moe_layer_indices(a, t)
    for r in layers:
        i, kept = r["layer"], r["kept"]
        assert len(kept) == 6 and sorted(kept + r["removed"]) == list(range(N))
        for j, e in enumerate(kept):
            for p in PROJS:
                assert torch.equal(new.projection(i, j, p), old.projection(i, e, p))
        assert torch.equal(b.load(t.router.format(i=i)), a.load(t.router.format(i=i))[kept])
        if t.router_bias:
            assert torch.equal(b.load(t.router_bias.format(i=i)), a.load(t.router_bias.format(i=i))[kept])
    untouched = [n for n in a.tensors if not any(n in old.names(r["layer"]) for r in layers)]
    assert untouched and all(torch.equal(a.load(n), b.load(n)) for n in untouched)  # shared experts among them
    logits = load(out)(torch.randint(0, 128, (2, 16))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.skipif(not TRANSFORMERS_5, reason="reap and ean read 5.x's fused experts")
@pytest.mark.parametrize("family", ["qwen3_moe", "glm4_moe", "granitemoe"])
def test_scores_match_a_hand_computation(tmp_path, family):
    """frequency, ean and reap of every expert against a computation from the router logits and
    the per-expert weights on disk (routing done by hand for each family)."""
    from moekit.runtime.models import load_model
    from moekit.jobs.prune import expert_scores

    overrides = {"routed_scaling_factor": 2.5} if family == "glm4_moe" else {}
    src = tiny.build(family, tmp_path / "src", **{TARGETS[family].fields.expert_fields[0]: N}, **overrides)
    model = load_model(src, device="cpu")[0]
    if TARGETS[family].router_bias:  # a non-zero selection bias: selection and weights must differ
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 128, (2, 24), generator=gen), torch.randint(0, 128, (1, 11), generator=gen)]
    got = expert_scores(model, batches)
    want = hand_scores(model, family, batches, load_file(src / "model.safetensors"))
    assert got.keys() == want.keys()
    for i in want:
        for method in ("frequency", "ean", "reap"):
            assert torch.allclose(got[i][method].double(), want[i][method], rtol=1e-4, atol=1e-6), (i, method)
        assert want[i]["frequency"].sum() == 2 * (2 * 24 + 11)


def hand_scores(model, family, batches, weights):
    t, cfg = TARGETS[family], model.config
    inputs: dict[int, list] = {}
    hooks = [(getattr(block, "mlp", None) or block.block_sparse_moe).register_forward_pre_hook(
        lambda m, a, i=i: inputs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1])))
        for i, block in enumerate(model.model.layers)]
    with torch.no_grad():
        for ids in batches:
            model.model(input_ids=ids)
    for h in hooks:
        h.remove()
    out = {}
    for i, xs in inputs.items():
        if t.router.format(i=i) not in weights:
            continue  # a dense layer
        x = torch.cat(xs).double()
        logits = x @ weights[t.router.format(i=i)].double().T
        k = cfg.num_experts_per_tok
        if family == "qwen3_moe":  # softmax over all, top-k, no renormalisation (tiny default)
            w, idx = logits.softmax(-1).topk(k)
        elif family == "glm4_moe":  # sigmoid, select on score + bias, renormalise, scale
            scores = logits.sigmoid()
            bias = dict(model.named_buffers())[f"model.layers.{i}.mlp.gate.e_score_correction_bias"].double()
            idx = (scores + bias).topk(k).indices
            w = scores.gather(1, idx)
            w = w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor
        else:  # granite: top-k of the logits, softmax over the k
            top, idx = logits.topk(k)
            w = top.softmax(-1)
        freq, ean, reap = (torch.zeros(N, dtype=torch.float64) for _ in range(3))
        for e in range(N):
            tok, slot = (idx == e).nonzero(as_tuple=True)
            gate, up, down = (t.experts.read(weights.__getitem__, i, e, p).double() for p in PROJS)
            y = torch.nn.functional.silu(x[tok] @ gate.T) * (x[tok] @ up.T) @ down.T
            norm = y.norm(dim=-1)
            freq[e], ean[e] = len(tok), norm.sum()
            reap[e] = (w[tok, slot] * norm).sum() / max(len(tok), 1)
        out[i] = {"frequency": freq, "ean": ean, "reap": reap}
    return out


@pytest.mark.skipif(not TRANSFORMERS_5, reason="reap reads 5.x's fused experts")
def test_each_method_keeps_its_best_scores(tmp_path):
    src = tiny.with_char_tokenizer(build("mixtral", tmp_path / "raw"), tmp_path / "src")
    calib = calibration_file(tmp_path)
    for method in ("reap", "ean", "frequency"):
        out = tmp_path / method
        assert prune(src, out, "--keep", "3", "--method", method, "--calibration", str(calib),
                     "--calibration-tokens", "1500").returncode == 0
        for r in json.loads((out / "moekit.json").read_text())["layers"]:
            s = torch.tensor(r["scores"][method])
            assert sorted(r["kept"]) == r["kept"] and len(r["kept"]) == 3
            assert s[r["kept"]].min() >= s[r["removed"]].max()
            assert set(r["scores"]) == ({"frequency"} if method == "frequency" else {"frequency", "ean", "reap"})


def test_frequency_from_a_profile_report(tmp_path):
    src = tiny.with_char_tokenizer(build("qwen3_moe", tmp_path / "raw"), tmp_path / "src")
    report = tmp_path / "profile.json"
    run_moekit("profile", str(src), "--data", str(calibration_file(tmp_path)), "--max-tokens", "512", "--seq-len", "64",
               "--device", "cpu", "--json", str(report), check=True)
    counts = {r["layer"]: r["tokens_per_expert"] for r in json.loads(report.read_text())["layers"]}
    assert prune(src, tmp_path / "out", "--keep", "5", "--method", "frequency", "--profile", str(report)).returncode == 0
    for r in json.loads((tmp_path / "out" / "moekit.json").read_text())["layers"]:
        c = torch.tensor(counts[r["layer"]], dtype=torch.float64)
        assert r["scores"]["frequency"] == c.tolist()
        assert c[r["kept"]].min() >= c[r["removed"]].max()


def test_softmax_without_renormalisation_warns_once(tmp_path):
    src = build("qwen3_moe", tmp_path / "src", norm_topk_prob=False)
    proc = prune(src, tmp_path / "out", "--keep", "6", "--method", "random")
    assert proc.returncode == 0
    assert sum("without renormalisation" in line for line in proc.stderr.splitlines()) == 1, proc.stderr
    assert json.loads((tmp_path / "out" / "moekit.json").read_text())["summary"]["weights_kept"] is False


def test_lowered_top_k(tmp_path):
    src = build("mixtral", tmp_path / "src")
    assert prune(src, tmp_path / "out", "--keep", "1", "--top-k", "1", "--method", "random").returncode == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (1, 1)
    assert torch.isfinite(load(tmp_path / "out")(torch.randint(0, 128, (1, 8))).logits).all()


def test_fused_and_router_rows_reach_the_writer_as_byte_ranges(tmp_path, monkeypatch):
    """Nothing is loaded: every kept tensor of a fused (Granite) layout, router rows included, is
    copied as runs of rows of the source file, and those bytes are what the computed path gives."""
    from moekit.checkpoint import open_checkpoint
    from moekit.checkpoint.reader import SafetensorsCheckpoint
    from moekit.surgery.prune import plan_prune

    src = build("granitemoe", tmp_path / "src")
    kept = {i: [0, 2, 3, 6, 7] for i in range(2)}
    plan = plan_prune(open_checkpoint(src), kept)
    fused = [o for o in plan.outputs if o.rows]
    assert len(fused) == 3 * 2 and all(len(o.source_ranges()[1]) == 3 for o in fused)  # runs 0, 2-3, 6-7
    for o in fused:
        path, ranges = o.source_ranges()
        with open(path, "rb") as f:
            raw = b"".join((f.seek(a), f.read(b - a))[1] for a, b in ranges)
        assert raw == o.produce().contiguous().view(torch.uint8).numpy().tobytes(), o.meta.name
    loaded = []
    real_load = SafetensorsCheckpoint.load
    monkeypatch.setattr(SafetensorsCheckpoint, "load", lambda self, name, dtype=None: (loaded.append(name),
                                                                                     real_load(self, name, dtype))[1])
    assert prune(src, tmp_path / "out", "--keep", "5", "--method", "random").returncode == 0
    assert loaded == []


@pytest.mark.parametrize("family,args,code,message", [
    ("mixtral", ["--keep", "8"], 2, "between 1 and 7"),
    ("mixtral", ["--keep", "1"], 2, "more than the 1 kept"),
    ("mixtral", ["--keep", "4", "--top-k", "5"], 2, "between 1 and the 4 experts kept"),
    ("mixtral", ["--keep", "4", "--ratio", "0.5"], 2, "exactly one of"),
    ("mixtral", [], 2, "exactly one of"),
    ("mixtral", ["--ratio", "1.0"], 2, "between 0 and 1"),
    ("mixtral", ["--keep", "4", "--method", "magic"], 2, "method: Input should be"),
    ("mixtral", ["--keep", "4", "--method", "reap", "--profile", "p.json"], 2, "only --method frequency uses"),
    ("mixtral", ["--keep", "4", "--layers", "0"], 2, "same number of experts"),
    ("deepseek_v3", ["--keep", "5"], 2, "group-limited routing"),
    ("deepseek_v3", ["--keep", "2"], 2, "at least 4"),
    ("llama", ["--keep", "4"], 3, "dense model"),
    ("gpt_oss", ["--keep", "2"], 3, "MoE layouts moekit writes"),
])
def test_bad_input_fails_cleanly(tmp_path, family, args, code, message):
    src = (build if family in TARGETS else tiny.build)(family, tmp_path / "src" / family)
    before = sorted(p.name for p in (tmp_path / "src" / family).iterdir())
    proc = prune(src, tmp_path / "out", *args)
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # nothing written
    assert sorted(p.name for p in (tmp_path / "src" / family).iterdir()) == before


def test_bad_profile_report(tmp_path):
    src = build("mixtral", tmp_path / "src")
    report = tmp_path / "p.json"
    report.write_text(json.dumps({"layers": [{"layer": 0, "tokens_per_expert": [1, 2]}]}))
    proc = prune(src, tmp_path / "out", "--keep", "4", "--method", "frequency", "--profile", str(report))
    assert proc.returncode == 3 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "out").exists()


def test_cast_on_the_way(tmp_path):
    """--dtype casts the kept weights (computed, not copied); the selection bias stays fp32."""
    from moekit.checkpoint import open_checkpoint

    src = build("glm4_moe", tmp_path / "src")
    assert prune(src, tmp_path / "out", "--keep", "6", "--method", "random", "--dtype", "bfloat16").returncode == 0
    out, t = open_checkpoint(tmp_path / "out"), TARGETS["glm4_moe"]
    assert out.meta(t.router.format(i=1)).dtype == torch.bfloat16
    assert out.meta(t.experts.tensor_name(1, 5, "down")).dtype == torch.bfloat16
    assert out.meta(t.router_bias.format(i=1)).dtype == torch.float32
    assert torch.isfinite(load(tmp_path / "out")(torch.randint(0, 128, (1, 8))).logits).all()


@pytest.mark.slow
@pytest.mark.skipif(not TRANSFORMERS_5, reason="reap reads 5.x's fused experts")
def test_smollm2_upcycled_then_pruned_keeps_the_dense_function(smollm2, tmp_path):
    """Real weights: the experts of an upcycled SmolLM2 are all the dense FFN, so REAP pruning on
    the built-in text (real routing, real expert norms) keeps the dense model's logits."""
    from tests.test_upcycle import upcycle

    upcycle(smollm2, tmp_path / "4x2", "-n", "4", "-k", "2", "--router-init", "kmeans")
    proc = prune(tmp_path / "4x2", tmp_path / "3x2", "--keep", "3", "--method", "reap", "--device", "cpu",
                 "--calibration-tokens", "2048")
    assert proc.returncode == 0, proc.stderr
    shutil.rmtree(tmp_path / "4x2")  # 1.5 GB of fp32; CI disks are small
    scores = json.loads((tmp_path / "3x2" / "moekit.json").read_text())["layers"][0]["scores"]
    assert sum(scores["frequency"]) == 2 * 2048 and len(set(scores["reap"])) == 4  # real, distinct scores
    assert max_rel_error(smollm2, tmp_path / "3x2", 49152, seed=21, shape=(2, 64)) <= 1e-5
