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


def test_fused_experts_run_in_bf16_under_autocast(tiny_models):
    """fp32 master weights, bf16 autocast: the grouped_mm experts must compute what a bf16 copy of
    them computes (transformers' grouped_mm would otherwise run them in fp32)."""
    import copy

    from moekit.hf import load_model
    from moekit.training import moe_blocks, use_experts_implementation

    model, _ = load_model(tiny_models("qwen3_moe"), torch.float32, "cuda")
    assert use_experts_implementation(model).startswith("grouped_mm")
    experts = next(iter(moe_blocks(model).values())).experts
    x = torch.randn(64, model.config.hidden_size, device="cuda")
    index = torch.randint(0, 4, (64, 2), device="cuda")
    weights = torch.rand(64, 2, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        fast = experts(x, index, weights).float()
    bf16 = copy.deepcopy(experts).to(torch.bfloat16)
    want = bf16(x.to(torch.bfloat16), index, weights).float()
    fp32 = experts(x, index, weights).float()  # no autocast: fp32 all through
    assert (fast - want).abs().max() <= 0.1 * (fp32 - want).abs().max()


def test_train_on_cuda_with_checkpointing(tiny_models, tmp_path):
    from moekit.training import TrainOptions, train_model

    rows = torch.randint(3, 128, (64, 32), generator=torch.Generator().manual_seed(0)).tolist()
    opts = TrainOptions(steps=4, lr=1e-2, batch_size=4, seq_len=32, aux_loss_coef=0.01, gradient_checkpointing=True,
                        eval_share=0.1, eval_every=2, save_every=2, log_every=1)
    summary = train_model(tiny_models("qwen3_moe"), tmp_path / "out", rows, None, None, opts)
    assert summary["experts"].startswith("grouped_mm") and summary["peak memory GiB"] > 0
    assert summary["last eval loss"] < summary["first eval loss"]
    assert summary["devices"].endswith("cuda") and (tmp_path / "out.checkpoints" / "checkpoint-4").is_dir()
