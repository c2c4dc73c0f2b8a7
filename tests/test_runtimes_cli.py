"""What the runtime table says reaches the user: write-time warnings and model-card caveats,
`inspect`'s runtime list, and `verify --runtime llama.cpp` (llama.cpp's own converter and runtime)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_moekit
from tests.tiny import build


def with_smollm2_tokenizer(family: str, root):
    """A tiny tied `family` model with SmolLM2's real tokenizer (one llama.cpp's converter accepts)."""
    import shutil

    from tests.test_runtime_matrix import smollm2_tokenizer

    folder = build(family, root / family, vocab_size=49152, tie_word_embeddings=True)
    for f in smollm2_tokenizer().iterdir():
        shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return with_smollm2_tokenizer("qwen2", tmp_path_factory.mktemp("qwen2"))


def test_renormalised_qwen2_moe_is_warned_about_and_softmax_topk_is_not(qwen2, tmp_path):
    proc = run_moekit("upcycle", str(qwen2), str(tmp_path / "renorm"), "-n", "4", "-k", "2", check=True)
    line = "llama.cpp: llama.cpp's qwen2moe never renormalises the top-k weights"
    assert sum(line in ln for ln in proc.stderr.splitlines()) == 1
    assert line in (tmp_path / "renorm" / "README.md").read_text()
    assert line in " ".join(json.loads((tmp_path / "renorm" / "moekit.json").read_text())["notes"])
    proc = run_moekit("upcycle", str(qwen2), str(tmp_path / "soft"), "-n", "4", "-k", "2", "--routing", "softmax-topk",
                      check=True)
    assert "llama.cpp" not in proc.stderr and "Caveats" not in (tmp_path / "soft" / "README.md").read_text()
    cfg = json.loads((tmp_path / "soft" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False  # lm_head.weight written: llama.cpp's qwen2moe cannot tie

    report = json.loads(run_moekit("inspect", str(tmp_path / "renorm"), "--json", check=True).stdout)["runtimes"]
    by = {r["runtime"]: r for r in report}
    assert by["llama.cpp"]["status"] == "wrong" and by["transformers 4.57"]["status"] == "exact"
    assert by["vLLM"]["how"] == "read, not run"
    report = json.loads(run_moekit("inspect", str(tmp_path / "soft"), "--json", check=True).stdout)["runtimes"]
    assert {r["status"] for r in report} == {"exact"}


def test_verify_in_llamacpp_passes_an_exact_child(tmp_path):
    """(A Llama parent: transformers 5.x tokenises a qwen2 folder with Qwen2Tokenizer whatever its
    tokenizer.json says, so SmolLM2's tokenizer in a qwen2 folder is one llama.cpp does not know.)"""
    from tests.test_runtime_matrix import missing

    from moekit.runtime import llamacpp

    try:
        llamacpp.converter_dir(), llamacpp.load_bindings()
    except Exception as e:
        missing(str(e))
    parent = with_smollm2_tokenizer("llama", tmp_path)
    run_moekit("upcycle", str(parent), str(tmp_path / "moe"), "-n", "4", "-k", "2", check=True)
    proc = run_moekit("verify", str(parent), str(tmp_path / "moe"), "--runtime", "llama.cpp", "--tokens", "64",
                      "--seq-len", "32", "--tolerance", "1e-4", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["max_rel_error"] <= 1e-4 and report["tokens"] == 64 and report["device"].startswith("llama.cpp")


def test_verify_in_llamacpp_without_the_converter_is_one_line(qwen2, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_LLAMACPP_SRC", str(tmp_path / "nowhere"))
    proc = run_moekit("verify", str(qwen2), str(qwen2), "--runtime", "llama.cpp")
    assert proc.returncode == 3 and "moekit[llamacpp]" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = run_moekit("verify", str(qwen2), str(qwen2), "--runtime", "vllm")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --runtime:") and "llama.cpp" in proc.stderr
