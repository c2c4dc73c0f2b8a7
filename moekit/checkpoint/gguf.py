"""GGUF files (llama.cpp's format) read as if they were Hugging Face checkpoints.

Tensors are dequantised one at a time with the `gguf` package; names and config fields are
mapped to transformers' by the tables below. Only architectures with a transformers dense
counterpart that moekit can do surgery on are mapped.
"""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

import torch

from moekit.checkpoint.base import Checkpoint, TensorMeta, cast
from moekit.errors import MoekitError

# gguf architecture -> (transformers model_type, HF class name, Q/K rows permuted by llama.cpp)
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}

# gguf tensor name -> HF name; `{i}` is the layer index.
TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
_PATTERNS = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in TENSOR_NAMES.items()]

# HF config field -> gguf metadata key, `{arch}.` prefixed where it starts with a dot.
CONFIG_FIELDS = {
    "num_hidden_layers": ".block_count",
    "max_position_embeddings": ".context_length",
    "hidden_size": ".embedding_length",
    "intermediate_size": ".feed_forward_length",
    "num_attention_heads": ".attention.head_count",
    "num_key_value_heads": ".attention.head_count_kv",
    "rope_theta": ".rope.freq_base",
    "rms_norm_eps": ".attention.layer_norm_rms_epsilon",
    "head_dim": ".attention.key_length",
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
}


def _hf_name(gguf_name: str) -> str | None:
    for pattern, hf in _PATTERNS:
        m = pattern.match(gguf_name)
        if m:
            return hf.replace("{i}", m.group(1)) if m.groups() else hf
    return None


def _unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of rotary halves in Q/K rows (its converter permutes them)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path, dtype: torch.dtype = torch.float32):
        super().__init__(path)
        self.dtype = dtype
        from gguf import GGUFReader

        try:
            self._reader = GGUFReader(path)
        except Exception as e:  # gguf raises ValueError / struct errors on bad files
            raise MoekitError(f"{path}: not a readable GGUF file (corrupt or truncated?): {e}") from None
        self.arch = self._field("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise MoekitError(f"{path}: GGUF architecture {self.arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
        self._by_hf_name = {}
        for t in self._reader.tensors:
            hf = _hf_name(t.name)
            if hf is None:
                raise MoekitError(f"{path}: GGUF tensor {t.name!r} has no Hugging Face counterpart moekit knows")
            self._by_hf_name[hf] = t

    def _field(self, key: str, default=None):
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    @cached_property
    def config(self) -> dict:
        model_type, hf_class, _ = ARCHITECTURES[self.arch]
        cfg: dict = {"architectures": [hf_class], "model_type": model_type, "hidden_act": "silu"}
        for hf_key, gguf_key in CONFIG_FIELDS.items():
            value = self._field(self.arch + gguf_key if gguf_key.startswith(".") else gguf_key)
            if value is not None:
                cfg[hf_key] = value
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        cfg["vocab_size"] = self._by_hf_name["model.embed_tokens.weight"].shape[-1].item()
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._by_hf_name
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
        cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._by_hf_name
        cfg["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        return cfg

    @cached_property
    def tensors(self) -> dict[str, TensorMeta]:
        return {
            hf: TensorMeta(hf, tuple(int(d) for d in reversed(t.shape)), self.dtype)
            for hf, t in self._by_hf_name.items()
        }

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        from gguf.quants import dequantize

        meta = self.meta(name)
        t = self._by_hf_name[name]
        array = dequantize(t.data, t.tensor_type).reshape(meta.shape)
        w = torch.from_numpy(array.copy()).float()
        if ARCHITECTURES[self.arch][2]:
            if name.endswith("self_attn.q_proj.weight"):
                w = _unpermute_rows(w, self.config["num_attention_heads"])
            elif name.endswith("self_attn.k_proj.weight"):
                w = _unpermute_rows(w, self.config["num_key_value_heads"])
        return cast(w, dtype or self.dtype)

    def weight_files(self) -> list[Path]:
        return [self.path]

    def write_side_files(self, dest: Path) -> list[str]:
        """The tokenizer lives inside the GGUF; transformers knows how to rebuild it from there."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.path.parent, gguf_file=self.path.name, trust_remote_code=False)
        written = [Path(f).name for f in tokenizer.save_pretrained(dest)]
        generation = {k: self.config[k] for k in ("bos_token_id", "eos_token_id") if k in self.config}
        (dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        return sorted(set(written) | {"generation_config.json"})
