"""`upcycle --routing softmax-topk`: softmax over all N experts, top-K, no renormalisation.

With a zero router every picked expert gets weight 1/N (K/N in all), so each expert's down_proj
× N/K makes the K identical experts add up to the dense FFN: exact at init.
"""

from __future__ import annotations

import json

import pytest
import torch

from moekit.checkpoint import open_checkpoint
from moekit.arch.targets import TARGETS
from tests.conftest import run_moekit
from tests.test_upcycle import max_rel_error

TAKERS = [(parent, t.model_type) for t in TARGETS.values() if t.softmax_topk for parent in t.parents]
REFUSERS = [t.model_type for t in TARGETS.values() if t.parents and not t.softmax_topk]


@pytest.mark.parametrize("parent,target", TAKERS, ids=[f"{p}-{t}" for p, t in TAKERS])
@pytest.mark.parametrize("n,k", [(4, 2), (6, 4)])  # N/K = 2 and 1.5 (not a power of two: exact in fp32 only)
def test_softmax_topk_is_exact_at_init(tiny_models, tmp_path, parent, target, n, k):
    src, out = tiny_models(parent), tmp_path / "moe"
    proc = run_moekit("upcycle", str(src), str(out), "-n", str(n), "-k", str(k), "--target", target,
                      "--routing", "softmax-topk", check=True)
    assert "not exact" not in proc.stderr and "power of two" not in proc.stderr  # fp32, zero router
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["norm_topk_prob"] is False
    ck, dense = open_checkpoint(out), open_checkpoint(src)
    router = ck.load(TARGETS[target].router.format(i=0))
    assert not router.any()  # the zero router is the default with this routing
    down = ck.load(TARGETS[target].experts.tensor_name(1, n - 1, "down"))
    assert torch.allclose(down, dense.load("model.layers.1.mlp.down_proj.weight") * n / k, rtol=0, atol=1e-7)
    assert max_rel_error(src, out, 128, seed=n * 31 + k) <= 1e-5
    # and the same output without the N/K factor is not exact: the factor is what the test checks
    record = json.loads((out / "moekit.json").read_text())
    assert record["layers"][0]["down_proj_scale"] == n / k and record["summary"]["exact"] is True


def test_without_the_factor_softmax_topk_is_off_by_k_over_n(tiny_models, tmp_path):
    src = tiny_models("qwen3")
    run_moekit("upcycle", str(src), str(tmp_path / "renorm"), "-n", "4", "-k", "2", "--router-init", "zero", check=True)
    cfg_path = tmp_path / "renorm" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "norm_topk_prob": False}))
    assert max_rel_error(src, tmp_path / "renorm", 128, seed=3) > 1e-2


@pytest.mark.parametrize("target", REFUSERS)
def test_targets_that_always_renormalise_refuse_it(tiny_models, tmp_path, target):
    parent = TARGETS[target].parents[0]
    proc = run_moekit("upcycle", str(tiny_models(parent)), str(tmp_path / "out"), "--target", target,
                      "--routing", "softmax-topk")
    assert proc.returncode == 2 and "--routing softmax-topk needs qwen2_moe, qwen3_moe or flex_olmo" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_a_non_zero_router_is_allowed_but_said_to_be_inexact(tiny_models, tmp_path):
    src, out = tiny_models("qwen3"), tmp_path / "moe"
    proc = run_moekit("upcycle", str(src), str(out), "-n", "4", "-k", "2", "--routing", "softmax-topk",
                      "--router-init", "random", "--json", check=True)
    assert "not exact at init" in proc.stderr and json.loads(proc.stdout)["exact"] is False
    assert "not exact at init" in (out / "README.md").read_text()
    assert max_rel_error(src, out, 128, seed=4) > 1e-5


def test_bf16_warns_when_n_over_k_is_not_a_power_of_two(tiny_models, tmp_path):
    src = tiny_models("qwen3")
    proc = run_moekit("upcycle", str(src), str(tmp_path / "a"), "-n", "6", "-k", "4", "--routing", "softmax-topk",
                      "--dtype", "bfloat16", check=True)
    assert "not a power of two" in proc.stderr
    proc = run_moekit("upcycle", str(src), str(tmp_path / "b"), "-n", "8", "-k", "2", "--routing", "softmax-topk",
                      "--dtype", "bfloat16", check=True)
    assert "power of two" not in proc.stderr
    ck, dense = open_checkpoint(tmp_path / "b"), open_checkpoint(src)
    assert torch.equal(ck.load("model.layers.0.mlp.experts.0.down_proj.weight"),  # × 4 is exact in bf16
                       dense.load("model.layers.0.mlp.down_proj.weight").bfloat16() * 4)
