"""Upcycling is exact for every (dense parent, MoE target) pair, loads cleanly, and fails cleanly."""

from __future__ import annotations

import json

import pytest
import torch

from moekit.arch.targets import TARGETS
from tests.conftest import run_moekit
from tests.families import PAIRS


def load(path, **kw):
    """A stock transformers model in fp32, and the loading report; fails on any key problem."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True, **kw)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"{path}: {problems}"
    return model.eval()


def max_rel_error(a_path, b_path, vocab: int, seed: int, shape=(3, 24), **load_kw) -> float:
    gen = torch.Generator().manual_seed(seed)  # fresh inputs for every pair
    ids = torch.randint(0, vocab, shape, generator=gen)
    with torch.no_grad():
        a, b = load(a_path, **load_kw)(ids).logits, load(b_path, **load_kw)(ids).logits
    return ((a - b).abs().max() / a.abs().max()).item()


def upcycle(src, out, *args):
    return run_moekit("upcycle", str(src), str(out), *args, check=True)


@pytest.mark.parametrize("parent,target", PAIRS, ids=[f"{p}-{t}" for p, t in PAIRS])
def test_upcycle_is_exact_and_native(tiny_models, tmp_path, parent, target):
    src, out = tiny_models(parent), tmp_path / "moe"
    t = TARGETS[target]
    upcycle(src, out, "-n", "4", "-k", "2", "--target", target, "--shared-experts", str(t.shared_range[1]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == target and cfg["num_experts_per_tok"] == 2
    assert all(cfg[f] == 4 for f in t.fields.expert_fields)
    assert max_rel_error(src, out, 128, seed=hash((parent, target)) % 2**31) <= 1e-5
    from moekit.checkpoint import open_checkpoint

    assert set(t.experts.names(1, 4)) <= set(open_checkpoint(out).tensors)  # the target's own expert keys on disk


@pytest.mark.parametrize("init", ["random", "uniform", "zero"])
def test_every_data_free_router_init_is_exact(tiny_models, tmp_path, init):
    src = tiny_models("llama")
    upcycle(src, tmp_path / "moe", "-n", "4", "-k", "2", "--router-init", init, "--target", "glm4_moe")
    assert max_rel_error(src, tmp_path / "moe", 128, seed=7) <= 1e-5


@pytest.mark.parametrize("target,spec,field,value", [
    ("qwen3_moe", "every:2", "mlp_only_layers", [0]),
    ("qwen3_moe", "0", "mlp_only_layers", [1]),
    ("glm4_moe", "skip-first:1", "first_k_dense_replace", 1),
])
def test_moe_layers_written_through_target_fields(tiny_models, tmp_path, target, spec, field, value):
    parent = "qwen3" if target == "qwen3_moe" else "llama"
    src = tiny_models(parent)
    upcycle(src, tmp_path / "moe", "-n", "4", "-k", "2", "--target", target, "--moe-layers", spec)
    assert json.loads((tmp_path / "moe" / "config.json").read_text())[field] == value
    assert max_rel_error(src, tmp_path / "moe", 128, seed=3) <= 1e-5
    report = json.loads(run_moekit("inspect", str(tmp_path / "moe"), "--json", check=True).stdout)
    assert report["moe"]["num_moe_layers"] == 1


def test_symmetry_breaking_drifts_and_differs_per_expert(tiny_models, tmp_path):
    from moekit.checkpoint import open_checkpoint

    src = tiny_models("llama")
    upcycle(src, tmp_path / "drop", "-n", "4", "-k", "2", "--drop-upcycling", "0.5", "--seed", "1")
    ck = open_checkpoint(tmp_path / "drop")
    w = [ck.load(f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight") for e in range(4)]
    dense = open_checkpoint(src).load("model.layers.0.mlp.gate_proj.weight")
    for e in range(4):  # half the neurons re-drawn: exactly that share of rows changed
        changed = (w[e] != dense).any(dim=1).float().mean().item()
        assert changed == pytest.approx(0.5, abs=1 / 128)
    assert not torch.equal(w[0], w[1])
    assert max_rel_error(src, tmp_path / "drop", 128, seed=5) > 1e-4
    upcycle(src, tmp_path / "noise", "-n", "4", "-k", "2", "--noise", "0.01")
    assert 1e-5 < max_rel_error(src, tmp_path / "noise", 128, seed=5) < 0.5


def test_expert_sources_take_each_expert_from_its_model(tiny_models, tmp_path):
    from moekit.checkpoint import open_checkpoint
    from tests import tiny

    base = tiny_models("llama")
    tunes = [tiny.build("llama", tmp_path / f"ft{i}", seed=10 + i) for i in range(2)]
    upcycle(base, tmp_path / "btx", "-n", "2", "-k", "1", "--expert-sources", ",".join(map(str, tunes)))
    ck = open_checkpoint(tmp_path / "btx")
    for e, ft in enumerate(tunes):
        assert torch.equal(ck.load(f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight"),
                           open_checkpoint(ft).load("model.layers.1.mlp.down_proj.weight"))
    assert torch.equal(ck.load("model.embed_tokens.weight"), open_checkpoint(base).load("model.embed_tokens.weight"))


def test_recipe_and_flags(tiny_models, tmp_path):
    src = tiny_models("llama")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source: {src}\noutput: {tmp_path / 'out'}\nexperts: 4\ntop_k: 1\ntarget: glm4_moe\n")
    run_moekit("upcycle", "--recipe", str(recipe), "--top-k", "2", check=True)  # the flag wins
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["n_routed_experts"], cfg["num_experts_per_tok"]) == (4, 2)
    record = json.loads((tmp_path / "out" / "moekit.json").read_text())
    assert record["options"]["top_k"] == 2 and len(record["layers"]) == 2


@pytest.mark.parametrize("args,message", [
    (["-n", "4", "-k", "5"], "--top-k"),
    (["-n", "1", "-k", "1"], "at least 2"),
    (["--target", "olmoe"], "post-norm"),
    (["--target", "deepseek_v3"], "latent attention"),
    (["--target", "qwen3_moe"], "not exact"),
    (["--target", "nonsense"], "unknown target"),
    (["--target", "mixtral", "--moe-layers", "0"], "every layer MoE"),
    (["--moe-layers", "7-9"], "outside"),
    (["--shared-experts", "2"], "shared experts"),
    (["--recipe", "/nonexistent.yaml"], "does not exist"),
])
def test_impossible_options_fail_cleanly(tiny_models, tmp_path, args, message):
    src = tiny_models("llama")
    proc = run_moekit("upcycle", str(src), str(tmp_path / "out"), *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("parent,change,message", [
    ("mistral", {"sliding_window": 16}, "sliding_window=16"),  # qwen2_moe's own window is not Mistral's
    ("llama", {"attention_bias": True}, "attention_bias=True"),  # it has no o_proj bias
])
def test_qwen2_moe_refuses_what_a_llama_parent_has_and_it_cannot_say(tiny_models, tmp_path, parent, change, message):
    from tests.tiny import copy_with_config

    src = copy_with_config(tiny_models(parent), tmp_path / "src", **change)
    proc = run_moekit("upcycle", str(src), str(tmp_path / "out"), "--target", "qwen2_moe")
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "out").exists()


def test_moe_source_refused(tiny_models, tmp_path):
    proc = run_moekit("upcycle", str(tiny_models("mixtral")), str(tmp_path / "out"))
    assert proc.returncode == 3 and "split-granularity or add-experts" in proc.stderr


def test_unknown_dense_family_refused(tiny_models, tmp_path):
    from tests.tiny import copy_with_config

    src = copy_with_config(tiny_models("llama"), tmp_path / "gemma-ish", model_type="gemma")
    before = (src / "model.safetensors").read_bytes()
    proc = run_moekit("upcycle", str(src), str(tmp_path / "out"))
    assert proc.returncode == 3 and "no upcycle for dense model_type 'gemma'" in proc.stderr
    assert (src / "model.safetensors").read_bytes() == before and not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["mixtral", "glm4_moe", "qwen2_moe"])
def test_smollm2_upcycle_is_exact(smollm2, tmp_path, target):
    out = tmp_path / target  # 4 experts, not 8: the same maths in half the disk (fp32, 1.5 GB)
    upcycle(smollm2, out, "-n", "4", "-k", "2", "--target", target, "--moe-layers",
            "all" if target == "mixtral" else "skip-first:2")
    assert max_rel_error(smollm2, out, 49152, seed=11, shape=(4, 128)) <= 1e-5


@pytest.mark.parametrize("target", ["mixtral", "glm4_moe"])
def test_data_router_inits_are_exact_and_data_driven(tiny_models, tmp_path, target):
    from moekit.checkpoint import open_checkpoint
    from tests.tiny import with_char_tokenizer

    src = with_char_tokenizer(tiny_models("llama"), tmp_path / "parent")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox {i * 7} jumps over {i % 5} lazy dogs."
                                 for i in range(60)))
    prompts = []
    for e, topic in enumerate(["numbers 1234 5678", "animals fox dog cat", "code def x(): return", "ZZZZ QQQQ XXXX"]):
        prompts += ["--prompts", str(tmp_path / f"p{e}.txt")]
        (tmp_path / f"p{e}.txt").write_text(f"{topic}\n\n{topic.upper()}")
    (tmp_path / "neg.txt").write_text("the and of")
    router = TARGETS[target].router.format(i=1)
    rows = {}
    for init, extra in (("kmeans", ["--calibration", str(calib), "--calibration-tokens", "400"]),
                        ("prompts", [*prompts, "--negative-prompts", str(tmp_path / "neg.txt")])):
        out = tmp_path / init
        upcycle(src, out, "-n", "4", "-k", "2", "--target", target, "--router-init", init, *extra)
        assert max_rel_error(src, out, 128, seed=9) <= 1e-5
        rows[init] = open_checkpoint(out).load(router)
        assert torch.linalg.matrix_rank(rows[init]) == 4  # four distinct directions, not copies
    assert not torch.allclose(rows["kmeans"], rows["prompts"])
    proc = run_moekit("upcycle", str(src), str(tmp_path / "bad"), "-n", "4", "--router-init", "prompts", *prompts[:2])
    assert proc.returncode == 2 and "one --prompts file per expert" in proc.stderr
