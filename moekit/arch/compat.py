"""Config and tokenizer files that transformers 4.57 and 5.x read the same.

5.x keeps RoPE settings only in `rope_parameters`; 4.57 reads top-level `rope_theta`,
`rope_scaling` and (GLM) `partial_rotary_factor`, and falls back to each class's default theta
(Mixtral 1e6, FlexOlmo 5e5) when they are missing. 5.x also writes tokenizer configs that 4.57
cannot load. Every output config and tokenizer folder goes through this module on its way to
disk: the RoPE settings are read as 5.x reads them and written in both forms.
"""

from __future__ import annotations

import json
from pathlib import Path

# The class default `rope_theta` of each family moekit reads or writes (the same in 4.57 and 5.x):
# a config that names no theta computes with this one, so a child of another family must say it.
DEFAULT_THETA = {
    "llama": 10000.0, "mistral": 10000.0, "qwen2": 10000.0, "qwen3": 10000.0, "olmo2": 10000.0,
    "granite": 10000.0, "mixtral": 1e6, "qwen2_moe": 10000.0, "qwen3_moe": 10000.0, "glm4_moe": 10000.0,
    "flex_olmo": 500000.0, "olmoe": 10000.0, "granitemoe": 10000.0, "granitemoeshared": 10000.0,
}

# RoPE fields 4.57 reads at the top level and 5.x inside `rope_parameters`.
ROPE_TOP_LEVEL = ("rope_theta", "partial_rotary_factor")
# Scaling types whose pretraining length 5.x fills in from max_position_embeddings.
ROPE_WITH_ORIGINAL_LENGTH = ("llama3", "yarn", "longrope")

# Config fields one line writes and the other reads under another name: (5.x name, 4.57 name).
ALIASES = {"qwen3_moe": (("num_local_experts", "num_experts"),)}

# tokenizer_config.json values 5.x writes that 4.57 cannot load, and what both load the same.
# 5.x's TokenizersBackend is its PreTrainedTokenizerFast (tokenizer.json as it is).
TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def rope_as_5x_reads_it(config: dict, defaults_of: str | None = None) -> dict | None:
    """The RoPE parameters transformers 5.x computes with: a truthy `rope_scaling` replaces
    `rope_parameters`, then top-level `rope_theta` / `partial_rotary_factor` fill what is
    missing, then the class default theta (of `defaults_of`, the config's own type by default).
    None when the config has no flat RoPE settings moekit knows how to carry over."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        return None  # per-layer-type RoPE: no family moekit writes has it
    params = dict(params)
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    theta = config.get("rope_theta", DEFAULT_THETA.get(defaults_of or config.get("model_type")))
    if "rope_theta" not in params and theta is None:
        return None
    params.setdefault("rope_theta", theta)
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    if params["rope_type"] in ROPE_WITH_ORIGINAL_LENGTH and "max_position_embeddings" in config:
        params.setdefault("original_max_position_embeddings",
                          config.get("original_max_position_embeddings", config["max_position_embeddings"]))
    return params


def for_both_lines(config: dict, defaults_of: str | None = None) -> dict:
    """`config` with its RoPE settings written in the 5.x form (`rope_parameters`) and the 4.x form
    (top-level `rope_theta`, `rope_scaling`, `partial_rotary_factor`), both as 5.x reads the
    config now, and with each aliased field under both names. `defaults_of`: the family whose
    class defaults the config was written against (a child's parent)."""
    config = dict(config)
    params = rope_as_5x_reads_it(config, defaults_of)
    if params is not None:
        config["rope_parameters"] = params
        for field in ROPE_TOP_LEVEL:
            if field in params:
                config[field] = params[field]
        scaling = {k: v for k, v in params.items() if k not in ROPE_TOP_LEVEL}
        config["rope_scaling"] = None if params["rope_type"] == "default" else scaling
    for new, old in ALIASES.get(config.get("model_type"), ()):
        value = config.get(new, config.get(old))
        if value is not None:
            config[new] = config[old] = value
    return config


def tokenizer_config_for_both_lines(folder: Path) -> bool:
    """Rewrite `folder/tokenizer_config.json` so that 4.57 loads it as 5.x does; True if changed."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return False
    cfg = json.loads(path.read_text())
    fixed = dict(cfg)
    if fixed.get("tokenizer_class") in TOKENIZER_CLASS:
        fixed["tokenizer_class"] = TOKENIZER_CLASS[fixed["tokenizer_class"]]
    if isinstance(fixed.get("extra_special_tokens"), list):  # 5.x's list is 4.x's additional_special_tokens
        fixed.setdefault("additional_special_tokens", fixed.pop("extra_special_tokens"))
    if fixed == cfg:
        return False
    path.write_text(json.dumps(fixed, indent=2, ensure_ascii=False) + "\n")
    return True
