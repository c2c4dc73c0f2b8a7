"""MoE architectures moekit writes: where each keeps experts and routers on disk, and which config
fields an upcycle sets. One `Target` per architecture; adding one is adding a row (see docs/upcycle.md).

Key templates use `{i}` for the layer, `{e}` for the expert and `{proj}` for the FFN projection,
whose names the target maps from moekit's `gate` / `up` / `down` (SwiGLU: down(act(gate x) * up x)).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moekit.architectures import SIGMOID_BIASED, SOFTMAX_RENORM, SOFTMAX_TOPK, TOPK_SOFTMAX, Routing

PROJS = ("gate", "up", "down")  # moekit's names for a SwiGLU FFN's projections
DENSE_FFN = "model.layers.{i}.mlp.{proj}_proj.weight"
HF_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
# q/k/v biases (name -> its size in ModelShape.size) of a target with `qkv_bias` whose parent has none
QKV_BIAS = {f"model.layers.{{i}}.self_attn.{p}_proj.bias": size for p, size in (("q", "q"), ("k", "kv"), ("v", "kv"))}


@dataclass(frozen=True)
class Target:
    model_type: str
    architecture: str
    routing: Routing
    parents: tuple[str, ...]  # dense model_types whose upcycle into this target is exact
    router: str
    expert: str | None = None  # per-expert key template
    proj: dict[str, str] = field(default_factory=lambda: dict(HF_PROJ))
    fused_gate_up: str | None = None  # granite: one [E, 2I, H] tensor, gate rows then up rows
    fused_down: str | None = None  # granite: one [E, H, I] tensor
    router_bias: str | None = None  # selection-only bias (DeepSeek-V3 style), fp32
    shared: str | None = None  # shared expert key template, with {proj}
    shared_gate: str | None = None  # Qwen2-MoE: sigmoid gate on the shared expert, [1, H]
    shared_fused: tuple[str, str] | None = None  # granite shared MLP: (gate_up key, down key)
    shared_range: tuple[int, int] = (0, 0)  # how many shared experts the target can hold
    experts_fields: tuple[str, ...] = ()  # config fields that hold N (several: both transformers lines)
    width_field: str = "intermediate_size"  # config field of the expert width
    shared_field: str | None = None  # config field for shared experts
    shared_is_count: bool = True  # False: the field is a width (one shared expert of that width)
    layer_fields: str = "all"  # how the target says which layers are MoE: all | sparse_step | first_k
    config: dict = field(default_factory=dict)  # fields set for exactness (BRIEF §4)
    parent_requires: dict = field(default_factory=dict)  # parent config values the target cannot change
    softmax_topk: bool = False  # can say "softmax over all experts, top-k, no renormalisation" (norm_topk_prob)
    # A runtime of this architecture never ties lm_head to the embeddings (moekit.runtimes): a tied
    # parent's child gets lm_head.weight written out and tie_word_embeddings false.
    untie: bool = False


_EXPERTS = "model.layers.{i}.mlp.experts.{e}.{proj}.weight"
_ROUTER = "model.layers.{i}.mlp.gate.weight"

TARGETS: dict[str, Target] = {t.model_type: t for t in [
    Target("mixtral", "MixtralForCausalLM", SOFTMAX_RENORM, ("llama", "mistral"),
           router="model.layers.{i}.block_sparse_moe.gate.weight",
           expert="model.layers.{i}.block_sparse_moe.experts.{e}.{proj}.weight",
           proj={"gate": "w1", "up": "w3", "down": "w2"},
           experts_fields=("num_local_experts",),
           parent_requires={"attention_bias": False, "mlp_bias": False}),
    # A Llama/Mistral parent has no q/k/v biases: the upcycle writes zero ones (QKV_BIAS), which add nothing.
    Target("qwen2_moe", "Qwen2MoeForCausalLM", SOFTMAX_TOPK, ("qwen2", "llama", "mistral"),
           router=_ROUTER, expert=_EXPERTS,
           shared="model.layers.{i}.mlp.shared_expert.{proj}.weight",
           shared_gate="model.layers.{i}.mlp.shared_expert_gate.weight", shared_range=(1, 1),
           experts_fields=("num_experts",), width_field="moe_intermediate_size",
           shared_field="shared_expert_intermediate_size", shared_is_count=False, layer_fields="sparse_step",
           config={"norm_topk_prob": True, "qkv_bias": True}, softmax_topk=True, untie=True,
           parent_requires={"attention_bias": False, "mlp_bias": False}),
    Target("qwen3_moe", "Qwen3MoeForCausalLM", SOFTMAX_TOPK, ("qwen3",),
           router=_ROUTER, expert=_EXPERTS,
           experts_fields=("num_experts", "num_local_experts"), width_field="moe_intermediate_size",
           layer_fields="sparse_step", config={"norm_topk_prob": True}, softmax_topk=True),
    Target("glm4_moe", "Glm4MoeForCausalLM", SIGMOID_BIASED, ("llama", "mistral", "qwen2", "qwen3"),
           router=_ROUTER, expert=_EXPERTS, router_bias="model.layers.{i}.mlp.gate.e_score_correction_bias",
           shared="model.layers.{i}.mlp.shared_experts.{proj}.weight", shared_range=(1, 8),
           experts_fields=("n_routed_experts",), width_field="moe_intermediate_size",
           shared_field="n_shared_experts", layer_fields="first_k",
           config={"norm_topk_prob": True, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                   "partial_rotary_factor": 1.0, "num_nextn_predict_layers": 0}, untie=True),
    Target("flex_olmo", "FlexOlmoForCausalLM", SOFTMAX_TOPK, ("olmo2",),
           router=_ROUTER, expert=_EXPERTS, experts_fields=("num_experts",),
           config={"norm_topk_prob": True}, softmax_topk=True, untie=True),
    Target("granitemoe", "GraniteMoeForCausalLM", TOPK_SOFTMAX, ("granite",),
           router="model.layers.{i}.block_sparse_moe.router.layer.weight",
           fused_gate_up="model.layers.{i}.block_sparse_moe.input_linear.weight",
           fused_down="model.layers.{i}.block_sparse_moe.output_linear.weight",
           experts_fields=("num_local_experts",), parent_requires={"mlp_bias": False}),
    Target("granitemoeshared", "GraniteMoeSharedForCausalLM", TOPK_SOFTMAX, ("granite",),
           router="model.layers.{i}.block_sparse_moe.router.layer.weight",
           fused_gate_up="model.layers.{i}.block_sparse_moe.input_linear.weight",
           fused_down="model.layers.{i}.block_sparse_moe.output_linear.weight",
           shared_fused=("model.layers.{i}.shared_mlp.input_linear.weight", "model.layers.{i}.shared_mlp.output_linear.weight"),
           shared_range=(1, 1), experts_fields=("num_local_experts",),
           shared_field="shared_intermediate_size", shared_is_count=False, parent_requires={"mlp_bias": False}),
    # Read (split, add experts), never an upcycle target: see WHY_NOT.
    Target("olmoe", "OlmoeForCausalLM", SOFTMAX_TOPK, (), router=_ROUTER, expert=_EXPERTS,
           experts_fields=("num_experts",)),
    *(Target(model_type, architecture, SIGMOID_BIASED, (), router=_ROUTER, expert=_EXPERTS,
             router_bias="model.layers.{i}.mlp.gate.e_score_correction_bias",
             shared="model.layers.{i}.mlp.shared_experts.{proj}.weight", shared_range=(1, 8),
             experts_fields=("n_routed_experts",), width_field="moe_intermediate_size",
             shared_field="n_shared_experts", layer_fields="first_k")
      for model_type, architecture in (("deepseek_v3", "DeepseekV3ForCausalLM"), ("dots1", "Dots1ForCausalLM"))),
]}

# The natural target of each dense family (BRIEF §4).
DEFAULT_TARGET = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe",
                  "olmo2": "flex_olmo", "granite": "granitemoe"}

# Why a target cannot take `--routing softmax-topk` (softmax over all experts, top-k, no renormalisation).
NO_SOFTMAX_TOPK = {
    "mixtral": "Mixtral always renormalises its top-k weights (no norm_topk_prob)",
    "glm4_moe": "GLM-4.5 routes with sigmoid scores, not a softmax over experts",
    "granitemoe": "GraniteMoe takes the softmax over the top-k logits only",
    "granitemoeshared": "GraniteMoeShared takes the softmax over the top-k logits only",
}

WHY_NOT = {
    "olmoe": "OLMoE normalises after attention and MLP (post-norm) where its dense parents normalise before: not exact",
    "deepseek_v3": "DeepSeek-V3 uses multi-head latent attention; a dense GQA model cannot become one",
    "dots1": "moekit reads dots1 (split, add experts, prune) but has no tested exact upcycle into it",
    "deepseek_v2": "DeepSeek-V2 uses multi-head latent attention; a dense GQA model cannot become one",
}
