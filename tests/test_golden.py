"""Behaviour pinned by hashes: fixed, deterministic surgeries on tiny models must write the same
bytes as when tests/golden_hashes.json was recorded (before the layout change of issue 10).

A refactor that changes what moekit writes fails here, whatever its own tests say. The parents
are built so that their bytes depend on nothing but their tensor names and shapes (not on the
installed transformers' random init); the hashes cover every `.safetensors` file and the
`config.json` of each output (without `transformers_version`, which names the installed line).

k-means router rows are the exception: centroids of calibration hidden states, whose last bits
depend on the CPU's matmul kernels (two machines with one torch wrote different rows), so their
values are left out of the hash (name, shape and dtype stay in) and tested for what they mean in
tests/test_upcycle.py and tests/test_add_experts.py.

Record anew only for an intended change of output, and say why in the commit:
`MOEKIT_WRITE_GOLDEN=1 pytest tests/test_golden.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import tiny
from tests.conftest import built_once, run_moekit

HASHES = Path(__file__).with_name("golden_hashes.json")
CALIBRATION = ("The quick brown fox jumps over the lazy dog. " * 40 + "\n\n") * 6 \
    + ("def add(a, b):\n    return a + b\n\n" * 30)

# name -> (parent family, moekit arguments after the command's SOURCE OUTPUT); "{calib}" is the text file
CASES = {
    "upcycle/mixtral": ("llama", ["upcycle", "-n", "4", "-k", "2"]),
    "upcycle/mixtral-noise": ("llama", ["upcycle", "-n", "4", "-k", "2", "--noise", "0.01", "--seed", "3"]),
    "upcycle/qwen3_moe-every2": ("qwen3", ["upcycle", "-n", "4", "-k", "2", "--moe-layers", "every:2"]),
    "upcycle/mixtral-drop-bf16": ("llama", ["upcycle", "-n", "4", "-k", "1", "--drop-upcycling", "0.5",
                                            "--dtype", "bfloat16"]),
    "upcycle/mixtral-kmeans": ("llama", ["upcycle", "-n", "4", "-k", "2", "--router-init", "kmeans",
                                         "--calibration", "{calib}", "--calibration-tokens", "600"]),
    "upcycle/qwen2_moe": ("qwen2", ["upcycle", "-n", "4", "-k", "2"]),
    "upcycle/qwen3_moe-softmax-topk": ("qwen3", ["upcycle", "-n", "4", "-k", "2", "--routing", "softmax-topk"]),
    "upcycle/qwen3_moe-uniform": ("qwen3", ["upcycle", "-n", "4", "-k", "2", "--router-init", "uniform"]),
    "upcycle/glm4_moe-shared": ("llama", ["upcycle", "-n", "4", "-k", "2", "--target", "glm4_moe",
                                          "--shared-experts", "1", "--moe-layers", "skip-first:1"]),
    "upcycle/flex_olmo": ("olmo2", ["upcycle", "-n", "4", "-k", "2"]),
    "upcycle/granitemoe": ("granite", ["upcycle", "-n", "4", "-k", "2"]),
    "upcycle/granitemoeshared": ("granite", ["upcycle", "-n", "4", "-k", "2", "--target", "granitemoeshared",
                                             "--shared-experts", "1"]),
    **{f"split/mixtral-{p}": ("mixtral", ["split-granularity", "-g", "2", "--partition", p])
       for p in ("contiguous", "random", "kmeans")},
    "split/qwen3_moe-coactivation": ("qwen3_moe", ["split-granularity", "-g", "2", "--partition", "coactivation",
                                                   "--calibration", "{calib}", "--calibration-tokens", "600"]),
    "split/granitemoe-contiguous": ("granitemoe", ["split-granularity", "-g", "2"]),
    "split/dense-llama": ("llama", ["split-granularity", "-g", "2", "--target", "mixtral"]),
    **{f"add-experts/glm4_moe-{init}": ("glm4_moe", ["add-experts", "-m", "2", "--init", init, "--copy-from", "0",
                                                     "--drift-tokens", "0"])
       for init in ("copy", "mean", "random", "drop-upcycling")},
    "add-experts/mixtral-kmeans-most-used": ("mixtral", ["add-experts", "-m", "1", "--router-init", "kmeans",
                                                         "--copy-from", "most-used", "--calibration", "{calib}",
                                                         "--calibration-tokens", "600", "--drift-tokens", "0"]),
    "add-experts/qwen3_moe-zero": ("qwen3_moe", ["add-experts", "-m", "2", "--router-init", "zero",
                                                 "--copy-from", "1", "--drift-tokens", "0"]),
    "prune/mixtral-random": ("mixtral", ["prune", "--keep", "2", "--method", "random"]),
    "prune/qwen3_moe-reap": ("qwen3_moe", ["prune", "--ratio", "0.5", "--method", "reap",
                                           "--calibration", "{calib}", "--calibration-tokens", "600"]),
    "prune/glm4_moe-frequency": ("glm4_moe", ["prune", "--keep", "3", "--method", "frequency",
                                              "--calibration", "{calib}", "--calibration-tokens", "600"]),
    "convert/qwen3-bf16": ("qwen3", ["convert", "--dtype", "bfloat16"]),
}


def deterministic_parent(family: str, folder: Path) -> Path:
    """A tiny `family` model whose weights are a function of each tensor's name and shape alone."""
    built = tiny.with_char_tokenizer(tiny.build(family, folder.with_name(folder.name + "-raw")), folder)
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        save_file({name: _fill(name, t) for name, t in sorted(tensors.items())}, shard, metadata={"format": "pt"})
    return built


def _fill(name: str, like: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    values = torch.randn(like.shape, generator=gen) * 0.05
    if name.endswith("norm.weight") or "layernorm" in name:
        values += 1.0
    return values.to(like.dtype)


# cases whose router rows are k-means centroids (values not hashed: see the module docstring)
KMEANS_ROUTERS = {"upcycle/mixtral-kmeans", "add-experts/mixtral-kmeans-most-used"}
ROUTER = re.compile(r"\.(gate|router)\.weight$")


def output_hashes(folder: Path, routers_by_shape: bool = False) -> dict[str, str]:
    """sha256 of every safetensors file and of config.json (less transformers_version); with
    `routers_by_shape`, of each file's tensors in name order, router weights by name, shape and
    dtype only."""
    config = json.loads((folder / "config.json").read_text())
    config.pop("transformers_version", None)
    hashes = {"config.json": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()}
    for f in sorted(folder.glob("*.safetensors")):
        if not routers_by_shape:
            hashes[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
            continue
        digest = hashlib.sha256()
        for name, t in sorted(load_file(f).items()):
            digest.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
            if not ROUTER.search(name):
                digest.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        hashes[f.name] = digest.hexdigest()
    return hashes


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    return built_once(tmp_path_factory.mktemp("golden-parents"), deterministic_parent)


@pytest.fixture(scope="module")
def recorded() -> dict:
    recording = os.environ.get("MOEKIT_WRITE_GOLDEN") == "1"
    hashes = {} if recording or not HASHES.exists() else json.loads(HASHES.read_text())
    yield hashes
    if recording:
        HASHES.write_text(json.dumps(dict(sorted(hashes.items())), indent=1) + "\n")


@pytest.mark.parametrize("case", sorted(CASES))
def test_output_bytes_are_unchanged(case, parents, recorded, tmp_path):
    family, args = CASES[case]
    calib = tmp_path / "calibration.txt"
    calib.write_text(CALIBRATION)
    command, *options = [a.replace("{calib}", str(calib)) for a in args]
    out = tmp_path / "out"
    run_moekit(command, str(parents(family)), str(out), *options, check=True)
    got = output_hashes(out, routers_by_shape=case in KMEANS_ROUTERS)
    if os.environ.get("MOEKIT_WRITE_GOLDEN") == "1":
        recorded[case] = got
        return
    assert case in recorded, f"no recorded hashes for {case}: record them (see the module docstring)"
    assert got == recorded[case]


def test_every_case_has_recorded_hashes(recorded):
    if os.environ.get("MOEKIT_WRITE_GOLDEN") == "1":
        pytest.skip("recording")
    assert sorted(recorded) == sorted(CASES)
