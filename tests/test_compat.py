"""Configs and tokenizer folders that transformers 4.57 and 5.x read the same (moekit.arch.compat).

The end-to-end check (children loaded in 4.57 and llama.cpp against the parent's 5.x logits) is
tests/test_runtime_matrix.py; these pin down the field mapping itself, in whichever line runs them.
"""

from __future__ import annotations

import json

import pytest

from moekit.arch.compat import for_both_lines, tokenizer_config_for_both_lines

SCALING = {
    "default": {},
    "linear": {"factor": 2.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0},
}


def form_5x(rope_type: str, theta: float = 1e5) -> dict:
    """What transformers 5.x writes: RoPE only in rope_parameters."""
    return {"model_type": "llama", "max_position_embeddings": 256,
            "rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **SCALING[rope_type]}}


def form_4x(rope_type: str, theta: float = 1e5) -> dict:
    """What transformers 4.57 writes: top-level rope_theta, rope_scaling (null for the default)."""
    return {"model_type": "llama", "max_position_embeddings": 256, "rope_theta": theta,
            "rope_scaling": {"rope_type": rope_type, **SCALING[rope_type]} if rope_type != "default" else None}


@pytest.mark.parametrize("rope_type", list(SCALING))
@pytest.mark.parametrize("form", [form_4x, form_5x], ids=["4x", "5x"])
def test_both_forms_are_written_and_agree(rope_type, form):
    cfg = for_both_lines(form(rope_type))
    assert cfg["rope_theta"] == 1e5 and cfg["rope_parameters"]["rope_theta"] == 1e5
    assert cfg["rope_parameters"]["rope_type"] == rope_type
    if rope_type == "default":
        assert cfg["rope_scaling"] is None
    else:
        assert cfg["rope_scaling"] == {"rope_type": rope_type, **SCALING[rope_type]}
        assert {k: cfg["rope_parameters"][k] for k in SCALING[rope_type]} == SCALING[rope_type]
    assert for_both_lines(cfg) == cfg  # a written config is a fixed point


def test_missing_theta_is_the_parents_class_default_not_the_childs():
    parent = {"model_type": "llama", "max_position_embeddings": 256}  # relies on Llama's 1e4
    child = for_both_lines({**parent, "model_type": "mixtral"}, defaults_of="llama")  # Mixtral's is 1e6
    assert child["rope_theta"] == 1e4 and child["rope_parameters"]["rope_theta"] == 1e4


def test_legacy_type_key_and_glm_partial_rotary_factor():
    cfg = for_both_lines({"model_type": "glm4_moe", "rope_theta": 1e6, "partial_rotary_factor": 1.0,
                          "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert cfg["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6, "partial_rotary_factor": 1.0}
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and cfg["partial_rotary_factor"] == 1.0


def test_expert_count_under_both_names():
    assert for_both_lines({"model_type": "qwen3_moe", "num_local_experts": 8})["num_experts"] == 8


def test_5x_tokenizer_config_is_made_loadable_by_4x(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "extra_special_tokens": ["<x>"]}))
    assert tokenizer_config_for_both_lines(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["additional_special_tokens"] == ["<x>"]
    assert "extra_special_tokens" not in cfg
    assert not tokenizer_config_for_both_lines(tmp_path)  # nothing left to change

