"""What moekit knows about each architecture, as data.

`ROUTING` names how a router turns logits into expert weights: it decides whether a
surgery is exact. `MOE_CONFIG` is the one table of config fields of every MoE family transformers
ships: the surgeries write them (`moekit.arch.targets` rows read theirs from here), inspect, profile,
training and balance read them. The surgery targets (which keys hold experts and routers on disk)
live in `moekit.arch.targets`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moekit.checkpoint import TensorMeta


@dataclass(frozen=True)
class Routing:
    key: str
    formula: str


SOFTMAX_RENORM = Routing("softmax_topk_renorm", "softmax → top-k → renormalise")
SOFTMAX_TOPK = Routing("softmax_topk", "softmax → top-k, renormalised only if norm_topk_prob")
SIGMOID_BIASED = Routing("sigmoid_biased", "sigmoid → top-k on score + e_score_correction_bias (group-limited) → /sum if norm_topk_prob → × routed_scaling_factor")
SOFTMAX_GROUPED = Routing("softmax_grouped", "softmax → group-limited top-k → × routed_scaling_factor")
TOPK_SOFTMAX = Routing("topk_softmax", "top-k on logits → softmax over the k")
SPARSEMIXER = Routing("sparsemixer", "sparsemixer (top-2 with jitter-masked softmax)")


@dataclass(frozen=True)
class MoEConfigFields:
    """Config fields of one MoE family; None where the family has no such field."""

    routing: Routing
    experts: str | tuple[str, ...]  # several names: a reader takes the first one present, a writer sets all
    top_k: str = "num_experts_per_tok"
    expert_width: str = "moe_intermediate_size"
    shared_experts: str | None = None  # a count of shared experts
    shared_width: str | None = None  # a width: one shared expert when > 0
    moe_layers: str = "all"  # how the config says which layers are MoE: all | sparse_step | first_k

    @property
    def expert_fields(self) -> tuple[str, ...]:
        """Every field that holds the expert count (what a surgery that changes it sets)."""
        return (self.experts,) if isinstance(self.experts, str) else self.experts


MOE_CONFIG: dict[str, MoEConfigFields] = {
    "mixtral": MoEConfigFields(SOFTMAX_RENORM, "num_local_experts", expert_width="intermediate_size"),
    "qwen2_moe": MoEConfigFields(SOFTMAX_TOPK, "num_experts", shared_width="shared_expert_intermediate_size",
                                 moe_layers="sparse_step"),
    # transformers 5.x serialises this count as num_local_experts; 4.57 reads num_experts
    "qwen3_moe": MoEConfigFields(SOFTMAX_TOPK, ("num_experts", "num_local_experts"), moe_layers="sparse_step"),
    "olmoe": MoEConfigFields(SOFTMAX_TOPK, "num_experts", expert_width="intermediate_size"),
    "flex_olmo": MoEConfigFields(SOFTMAX_TOPK, "num_experts", expert_width="intermediate_size"),
    "glm4_moe": MoEConfigFields(SIGMOID_BIASED, "n_routed_experts", shared_experts="n_shared_experts",
                                moe_layers="first_k"),
    "deepseek_v3": MoEConfigFields(SIGMOID_BIASED, "n_routed_experts", shared_experts="n_shared_experts",
                                   moe_layers="first_k"),
    "dots1": MoEConfigFields(SIGMOID_BIASED, "n_routed_experts", shared_experts="n_shared_experts",
                             moe_layers="first_k"),
    "deepseek_v2": MoEConfigFields(SOFTMAX_GROUPED, "n_routed_experts", shared_experts="n_shared_experts",
                                   moe_layers="first_k"),
    "granitemoe": MoEConfigFields(TOPK_SOFTMAX, "num_local_experts", expert_width="intermediate_size"),
    "granitemoeshared": MoEConfigFields(TOPK_SOFTMAX, "num_local_experts", expert_width="intermediate_size",
                                        shared_width="shared_intermediate_size"),
    "gpt_oss": MoEConfigFields(TOPK_SOFTMAX, "num_local_experts", expert_width="intermediate_size"),
    "jetmoe": MoEConfigFields(TOPK_SOFTMAX, "num_local_experts", expert_width="intermediate_size"),
    "phimoe": MoEConfigFields(SPARSEMIXER, "num_local_experts", expert_width="intermediate_size"),
}

# Dense families moekit does surgery on, all with a SwiGLU `mlp.{gate,up,down}_proj` FFN.
DENSE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite")


# Tensor names: a layer's, a shared expert's, a routed expert's (per-expert or fused Granite keys).
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
SHARED = re.compile(r"shared_expert|shared_mlp")
ROUTED = re.compile(r"\.experts\.|\.block_sparse_moe\.(?:input|output)_linear\.")


def holds_routed_experts(tensors: dict[str, TensorMeta]) -> bool:
    """True for an MoE checkpoint: a layer holds routed (not shared) expert weights. The same test
    as `moekit inspect`'s kind, from tensor headers alone."""
    return any(LAYER.search(name) and not SHARED.search(name) and ROUTED.search(name) and meta.numel
               for name, meta in tensors.items())


def read_field(config: dict, field: str | tuple[str, ...] | None):
    """A config value; nested configs (`text_config`) are looked into as well."""
    if isinstance(field, tuple):
        return next((v for v in (read_field(config, f) for f in field) if v is not None), None)
    if field is None:
        return None
    if field in config:
        return config[field]
    for nested in ("text_config", "ffn_config"):
        if isinstance(config.get(nested), dict) and field in config[nested]:
            return config[nested][field]
    return None


def child_weight_factor(routing: Routing, config: dict, granularity: int) -> float:
    """The factor on each fine-grained child's down projection that makes G children, routed
    together, add up to their parent.

    Children share the parent's router row, so they tie, and top-(K·G) picks exactly the children
    of the K parents the old router picked. Where weights come from a softmax over experts, or are
    renormalised over the chosen ones, each child gets the parent's weight / G: factor G. Sigmoid
    scores without renormalisation are per expert, so each child keeps the parent's full weight.
    """
    if routing is SIGMOID_BIASED and not config.get("norm_topk_prob"):
        return 1.0
    return float(granularity)


# What a checkpoint must hold before any surgery writes a byte (checked by moekit.surgery.requirements):
# tensor name -> shape, in config terms. `{i}` is a layer; q = heads × head_dim, kv = kv heads × head_dim.
MODEL_TENSORS = {
    "model.embed_tokens.weight": ("vocab_size", "hidden_size"),
    "model.norm.weight": ("hidden_size",),
}
UNTIED_HEAD = {"lm_head.weight": ("vocab_size", "hidden_size")}  # unless tie_word_embeddings
ATTENTION_TENSORS = {
    "model.layers.{i}.self_attn.q_proj.weight": ("q", "hidden_size"),
    "model.layers.{i}.self_attn.k_proj.weight": ("kv", "hidden_size"),
    "model.layers.{i}.self_attn.v_proj.weight": ("kv", "hidden_size"),
    "model.layers.{i}.self_attn.o_proj.weight": ("hidden_size", "q"),
}
# Latent attention (MLA: q_a/q_b/kv_a/kv_b projections, shapes set by five ranks) is left to
# transformers' own loading; these families' experts and routers are still checked.
LATENT_ATTENTION = ("deepseek_v2", "deepseek_v3")
DENSE_FFN_TENSORS = {
    "model.layers.{i}.mlp.gate_proj.weight": ("intermediate_size", "hidden_size"),
    "model.layers.{i}.mlp.up_proj.weight": ("intermediate_size", "hidden_size"),
    "model.layers.{i}.mlp.down_proj.weight": ("hidden_size", "intermediate_size"),
}
_PRE_NORM = {"model.layers.{i}.input_layernorm.weight": ("hidden_size",),
             "model.layers.{i}.post_attention_layernorm.weight": ("hidden_size",)}
# Per-layer norms of each dense family (OLMo 2 normalises after attention and MLP, and its q/k norms
# span all heads; Qwen3's span one head).
DENSE_LAYER_NORMS = {
    "llama": _PRE_NORM, "mistral": _PRE_NORM, "qwen2": _PRE_NORM, "granite": _PRE_NORM,
    "qwen3": {**_PRE_NORM, "model.layers.{i}.self_attn.q_norm.weight": ("head_dim",),
              "model.layers.{i}.self_attn.k_norm.weight": ("head_dim",)},
    "olmo2": {"model.layers.{i}.post_attention_layernorm.weight": ("hidden_size",),
              "model.layers.{i}.post_feedforward_layernorm.weight": ("hidden_size",),
              "model.layers.{i}.self_attn.q_norm.weight": ("q",),
              "model.layers.{i}.self_attn.k_norm.weight": ("kv",)},
}
