"""GPU paths: forward passes and clustering on CUDA give the same exact surgery as on CPU."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import run_moekit
from tests.test_upcycle import max_rel_error, upcycle
from tests.tiny import with_char_tokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture
def calib(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(f"row {i}: {'xyz' * (i % 3)} {i * 17} the end" for i in range(80)))
    return path


def test_kmeans_router_init_on_cuda(tiny_models, tmp_path, calib):
    src = with_char_tokenizer(tiny_models("llama"), tmp_path / "src")
    upcycle(src, tmp_path / "moe", "-n", "4", "-k", "2", "--router-init", "kmeans", "--device", "cuda",
            "--calibration", str(calib), "--calibration-tokens", "500")
    assert max_rel_error(src, tmp_path / "moe", 128, seed=1) <= 1e-5


@pytest.mark.parametrize("method", ["kmeans", "coactivation"])
def test_split_partitions_on_cuda(tiny_models, tmp_path, calib, method):
    src = with_char_tokenizer(tiny_models("qwen3_moe"), tmp_path / "src")
    run_moekit("split-granularity", str(src), str(tmp_path / "fine"), "-g", "4", "--partition", method,
               "--device", "cuda", "--calibration", str(calib), "--calibration-tokens", "500", check=True)
    assert max_rel_error(src, tmp_path / "fine", 128, seed=2) <= 1e-5


def test_add_experts_kmeans_on_cuda(tiny_models, tmp_path, calib):
    """Counting and clustering on the GPU, router rows written from the CPU side."""
    src = with_char_tokenizer(tiny_models("glm4_moe"), tmp_path / "src")
    run_moekit("add-experts", str(src), str(tmp_path / "g"), "-m", "2", "--router-init", "kmeans",
               "--calibration", str(calib), "--calibration-tokens", "500", "--device", "cuda", "--drift-tokens", "256",
               check=True)


@pytest.mark.parametrize("implementation", ["moekit_grouped_mm", "grouped_mm"])
def test_fused_experts_run_in_bf16_under_autocast(tiny_models, monkeypatch, implementation):
    """fp32 master weights, bf16 autocast: the grouped matmuls of the experts must get bf16 weights
    (transformers' grouped_mm is not autocast-enabled and would run them in fp32), and fp32 ones
    without autocast; the gradient reaches the fp32 parameters. moekit's function and transformers'."""
    from moekit.runtime.models import load_model
    from moekit.runtime.moe import moe_layers
    from moekit.training import use_experts_implementation

    seen = []
    for owner, name in ((torch.nn.functional, "grouped_mm"), (torch, "_grouped_mm")):
        original = getattr(owner, name, None)
        if original is not None:
            def spy(input, weight, *args, original=original, **kwargs):
                seen.append((input.dtype, weight.dtype))
                return original(input, weight, *args, **kwargs)
            monkeypatch.setattr(owner, name, spy)
    model, _ = load_model(tiny_models("qwen3_moe"), torch.float32, "cuda")
    assert use_experts_implementation(model, implementation).startswith(implementation)
    experts = moe_layers(model)[0].experts
    x = torch.randn(64, model.config.hidden_size, device="cuda")
    index = torch.randint(0, 4, (64, 2), device="cuda")
    weights = torch.rand(64, 2, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        fast = experts(x, index, weights)
    assert seen and all(dtypes == (torch.bfloat16, torch.bfloat16) for dtypes in seen), seen
    fast.float().sum().backward()
    assert experts.gate_up_proj.grad.dtype == torch.float32 and experts.gate_up_proj.grad.abs().sum() > 0
    seen.clear()
    slow = experts(x, index, weights)
    assert seen and all(dtypes == (torch.float32, torch.float32) for dtypes in seen), seen
    rel = ((fast.float() - slow) .norm() / slow.norm()).item()
    assert 1e-5 < rel < 3e-2  # bf16's rounding, not a different function


@pytest.mark.parametrize("weights,expected", [("auto", "bf16"), ("fp32", "fp32")])
def test_train_on_cuda_with_checkpointing(tiny_models, tmp_path, weights, expected):
    from moekit.training import TrainOptions, train_model

    rows = [[3 + (i + j) % 50 for j in range(32)] for i in range(64)]  # a pattern the model can learn in 4 steps
    opts = TrainOptions(steps=4, lr=3e-3, batch_size=4, seq_len=32, aux_loss_coef=0.01, gradient_checkpointing=True,
                        eval_share=0.1, eval_every=2, save_every=2, log_every=1, weights=weights)
    summary = train_model(tiny_models("qwen3_moe"), tmp_path / "out", rows, None, None, opts)
    assert summary["experts"].startswith("moekit_grouped_mm") and summary["peak_memory_gib"] > 0
    assert summary["weights"].startswith(expected)
    assert summary["last_eval_loss"] < summary["first_eval_loss"]
    assert summary["devices"].endswith("cuda") and (tmp_path / "out.checkpoints" / "checkpoint-4").is_dir()
