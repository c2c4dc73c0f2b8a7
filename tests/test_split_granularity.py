"""split-granularity is exact for every routing family and partition method, and fails cleanly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from moekit.arch.targets import TARGETS
from tests.conftest import run_moekit
from tests.families import UNGROUPED
from tests.test_upcycle import max_rel_error, upcycle


def split(src, out, *args):
    return run_moekit("split-granularity", str(src), str(out), *args, check=True)


# MoE models as transformers itself builds them: trained-looking (distinct) experts and routers.
@pytest.mark.parametrize("family", UNGROUPED)
@pytest.mark.parametrize("method", ["contiguous", "random", "kmeans"])
def test_split_of_native_moe_is_exact(tiny_models, tmp_path, family, method):
    src, out = tiny_models(family), tmp_path / "fine"
    split(src, out, "-g", "4", "--partition", method)
    cfg, old = (json.loads((p / "config.json").read_text()) for p in (out, src))
    t = TARGETS[family]
    assert all(cfg[f] == 16 for f in t.fields.expert_fields) and cfg["num_experts_per_tok"] == 8
    assert cfg[t.fields.expert_width] == old[t.fields.expert_width] // 4
    assert max_rel_error(src, out, 128, seed=len(family)) <= 1e-5


@pytest.mark.parametrize("norm", [True, False])
def test_sigmoid_routing_factor_follows_norm_topk_prob(tmp_path, norm):
    """GLM / DeepSeek-V3: without renormalisation each child keeps the parent's whole weight."""
    from moekit.checkpoint import open_checkpoint
    from tests import tiny

    src = tiny.build("glm4_moe", tmp_path / "src", norm_topk_prob=norm, routed_scaling_factor=2.5)
    split(src, tmp_path / "fine", "-g", "2")
    assert max_rel_error(src, tmp_path / "fine", 128, seed=1) <= 1e-5
    record = json.loads((tmp_path / "fine" / "moekit.json").read_text())
    assert record["layers"][0]["factor"] == (2.0 if norm else 1.0)
    bias = open_checkpoint(tmp_path / "fine").load("model.layers.1.mlp.gate.e_score_correction_bias")
    assert bias.dtype == torch.float32 and bias.shape == (8,)


def test_factor_that_is_not_a_power_of_two(tmp_path):
    """G = 3 under softmax routing: children's down projections scaled by 3 (rounded once, in fp32)."""
    from tests import tiny

    src = tiny.build("mixtral", tmp_path / "src", intermediate_size=48)
    split(src, tmp_path / "fine", "-g", "3")
    assert json.loads((tmp_path / "fine" / "moekit.json").read_text())["layers"][0]["factor"] == 3.0
    assert max_rel_error(src, tmp_path / "fine", 128, seed=4) <= 1e-5


@pytest.mark.parametrize("parent,target", [(t.parents[0], t.model_type) for t in TARGETS.values() if t.parents])
def test_split_of_upcycled_models_is_exact(tiny_models, tmp_path, parent, target):
    src = tiny_models(parent)
    upcycle(src, tmp_path / "moe", "-n", "4", "-k", "2", "--target", target, "--noise", "0.05", "--seed", "3")
    split(tmp_path / "moe", tmp_path / "fine", "-g", "2", "--partition", "random")
    assert max_rel_error(tmp_path / "moe", tmp_path / "fine", 128, seed=2) <= 1e-5


def test_dense_source_is_upcycled_and_split_in_one_pass(tiny_models, tmp_path):
    src = tiny_models("qwen3")
    split(src, tmp_path / "fine", "-g", "8", "--partition", "kmeans")
    cfg = json.loads((tmp_path / "fine" / "config.json").read_text())
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["moe_intermediate_size"]) == (8, 8, 16)
    assert max_rel_error(src, tmp_path / "fine", 128, seed=4) <= 1e-5


def test_one_neuron_experts(tiny_models, tmp_path):
    """G = I (the PEER direction): works, and inspect shows what the router costs."""
    src = tiny_models("mixtral")
    split(src, tmp_path / "fine", "-g", "128")  # Mixtral's expert width is intermediate_size, 128
    # transformers 5.x's default grouped_mm kernels need expert rows of 16-byte multiples: one
    # fp32 neuron is 4 bytes, so such models run with the eager experts (4.57 has only those).
    import transformers

    eager = {"experts_implementation": "eager"} if int(transformers.__version__.split(".")[0]) >= 5 else {}
    assert max_rel_error(src, tmp_path / "fine", 128, seed=6, **eager) <= 1e-5
    before, after = (json.loads(run_moekit("inspect", str(p), "--json", check=True).stdout)["moe"]
                     for p in (src, tmp_path / "fine"))
    assert after["experts"] == 4 * 128 and after["expert_width"] == 1
    assert after["router_flops_share"] > 10 * before["router_flops_share"]


def test_coactivation_partition(tiny_models, tmp_path):
    from tests.tiny import with_char_tokenizer

    src = with_char_tokenizer(tiny_models("qwen3_moe"), tmp_path / "src")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"line {i}: {'abc' * (i % 4)} {i * 31} xyz" for i in range(50)))
    split(src, tmp_path / "fine", "-g", "4", "--partition", "coactivation", "--calibration", str(calib),
          "--calibration-tokens", "300")
    assert max_rel_error(src, tmp_path / "fine", 128, seed=8) <= 1e-5
    perms = json.loads((tmp_path / "fine" / "moekit.json").read_text())["layers"][0]["permutations"]
    assert sorted(perms["0"]) == list(range(32)) and perms["0"] != list(range(32))


def test_changed_top_k_is_allowed_but_not_exact(tiny_models, tmp_path):
    src = tiny_models("mixtral")
    out = json.loads(run_moekit("split-granularity", str(src), str(tmp_path / "fine"), "-g", "2", "-k", "2",
                                "--json", check=True).stdout)
    assert out["exact"] is False and out["top_k"] == 2
    assert max_rel_error(src, tmp_path / "fine", 128, seed=1) > 1e-4


@pytest.mark.parametrize("args,message", [
    (["-g", "3"], "widths that work: 2, 4, 8, 16, 32"),
    (["-g", "1"], "at least 2"),
    (["-g", "2", "-k", "9"], "between 1 and 8"),
    (["-g", "2", "--partition", "magic"], "partition: Input should be 'contiguous', 'random', 'kmeans' or 'coactivation'"),
])
def test_impossible_options_fail_cleanly(tiny_models, tmp_path, args, message):
    proc = run_moekit("split-granularity", str(tiny_models("mixtral")), str(tmp_path / "out"), *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_group_limited_routing_refused(tmp_path):
    from tests import tiny

    src = tiny.build("glm4_moe", tmp_path / "src", n_group=2, topk_group=1)
    proc = run_moekit("split-granularity", str(src), str(tmp_path / "out"), "-g", "2")
    assert proc.returncode == 2 and "group-limited" in proc.stderr


def test_unknown_moe_refused(tiny_models, tmp_path):
    proc = run_moekit("split-granularity", str(tiny_models("gpt_oss")), str(tmp_path / "out"), "-g", "2")
    assert proc.returncode == 3 and "MoE layouts moekit writes" in proc.stderr


@pytest.mark.slow
def test_smollm2_dense_to_4x2_to_16x8_and_dense_to_g8(smollm2, tmp_path):
    upcycle(smollm2, tmp_path / "4x2", "-n", "4", "-k", "2")
    split(tmp_path / "4x2", tmp_path / "16x8", "-g", "4", "--partition", "kmeans")
    assert max_rel_error(smollm2, tmp_path / "16x8", 49152, seed=12, shape=(4, 128)) <= 1e-5
    for done in ("4x2", "16x8"):  # 1.5 GB of fp32 each; CI disks are small
        shutil.rmtree(tmp_path / done)
    split(smollm2, tmp_path / "g8", "-g", "8")
    assert max_rel_error(smollm2, tmp_path / "g8", 49152, seed=13, shape=(4, 128)) <= 1e-5


def test_contiguous_children_of_gate_and_up_are_copied_row_ranges(tiny_models):
    """They reach the writer as byte ranges of the parent's file (copy_file_range), and those
    bytes are exactly what the computed path would write; down children are computed (scaled)."""
    from moekit.checkpoint import open_checkpoint
    from moekit.surgery.split import plan_split

    plan = plan_split(open_checkpoint(tiny_models("mixtral")), 2)
    copied = [o for o in plan.outputs if o.rows]
    assert copied and {o.meta.name.rsplit(".", 2)[-2] for o in copied} == {"w1", "w3"}  # gate, up
    for o in copied:
        path, start, end = o.source_bytes()
        with open(path, "rb") as f:
            f.seek(start)
            assert f.read(end - start) == o.produce().contiguous().view(torch.uint8).numpy().tobytes(), o.meta.name
