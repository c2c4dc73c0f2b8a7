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
