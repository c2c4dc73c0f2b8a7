"""Tiny random models built from real transformers configs, saved with save_pretrained.

Small enough that a forward pass takes milliseconds, real enough that every key name, config
field and loading path is the one a full-size checkpoint of that family has.
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)

# model_type -> config overrides on top of COMMON
DENSE = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {},
    "olmo2": {},
    "granite": {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
                "logits_scaling": 8.0},
}
MOE_FAMILIES = {
    "mixtral": {"num_local_experts": 4, **MOE},
    "qwen2_moe": {"num_experts": 4, "shared_expert_intermediate_size": 64, **MOE},
    "qwen3_moe": {"num_experts": 4, **MOE},
    "olmoe": {"num_experts": 4, **MOE},
    "flex_olmo": {"num_experts": 4, **MOE},
    "glm4_moe": {"n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, **MOE},
    "deepseek_v3": {"n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2,
                    "topk_group": 1, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8,
                    "qk_nope_head_dim": 8, "v_head_dim": 16,
                    "head_dim": 8, "num_key_value_heads": 4, **MOE},  # MLA: head_dim is the rope part; 4.57 wants kv = heads
    "dots1": {"n_routed_experts": 4, "n_shared_experts": 1, "first_k_dense_replace": 1, **MOE},
    "granitemoe": {"num_local_experts": 4, **MOE},
    "granitemoeshared": {"num_local_experts": 4, "shared_intermediate_size": 64, **MOE},
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "layer_types": ["sliding_attention", "full_attention"]},
}


def build(model_type: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Save a tiny random `model_type` model (fp32) in `path` and return it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**COMMON, **DENSE.get(model_type, {}), **MOE_FAMILIES.get(model_type, {}), **overrides}
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # some families initialise norms or biases to constants; make them random too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(path)
    return path


def with_char_tokenizer(model: Path, dst: Path) -> Path:
    """A copy of `model` with a character-level tokenizer whose ids fit its 128-token vocabulary."""
    import shutil
    import string

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<pad>", "<s>", "</s>", "<unk>", *string.printable[:95], "\n"]
    bpe = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    shutil.copytree(model, dst)
    PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(dst)
    return dst


def copy_with_config(model: Path, dst: Path, **changes) -> Path:
    """A copy of `model` whose config.json has `changes` applied."""
    import json
    import shutil

    shutil.copytree(model, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst
