"""MoE architectures moekit writes: where each keeps experts and routers on disk, and the config
values an upcycle sets. One `Target` per architecture; adding one is adding a row here and its config
fields in `moekit.arch.families.MOE_CONFIG` (see docs/upcycle.md).

Key templates use `{i}` for the layer; how experts lie on disk (per expert or fused) is an
`ExpertLayout` (`moekit.arch.layouts`), whose `{e}` is the expert and `{proj}` the FFN projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from moekit.arch.families import MOE_CONFIG, MoEConfigFields, Routing
from moekit.arch.layouts import ExpertLayout, Fused, PerExpert

DENSE_FFN = "model.layers.{i}.mlp.{proj}_proj.weight"
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
# q/k/v biases (name -> its size in ModelShape.size) of a target with `qkv_bias` whose parent has none
QKV_BIAS = {f"model.layers.{{i}}.self_attn.{p}_proj.bias": size for p, size in (("q", "q"), ("k", "kv"), ("v", "kv"))}


@dataclass(frozen=True)
class Target:
    model_type: str
    architecture: str
    parents: tuple[str, ...]  # dense model_types whose upcycle into this target is exact
    router: str
    experts: ExpertLayout  # the routed experts
    router_bias: str | None = None  # selection-only bias (DeepSeek-V3 style), fp32
    shared: ExpertLayout | None = None  # the shared expert(s), one tensor set of their summed width
    shared_gate: str | None = None  # Qwen2-MoE: sigmoid gate on the shared expert, [1, H]
    shared_range: tuple[int, int] = (0, 0)  # how many shared experts the target can hold
    config: dict = field(default_factory=dict)  # fields set for exactness
    # Fields whose value depends on the parent's config (parent config -> fields), set last.
    from_parent: Callable[[dict], dict] | None = None
    parent_requires: dict = field(default_factory=dict)  # parent config values the target cannot change
    softmax_topk: bool = False  # can say "softmax over all experts, top-k, no renormalisation" (norm_topk_prob)
    # A runtime of this architecture never ties lm_head to the embeddings (moekit.arch.runtimes): a tied
    # parent's child gets lm_head.weight written out and tie_word_embeddings false.
    untie: bool = False

    @property
    def fields(self) -> MoEConfigFields:
        """The config fields this architecture keeps its expert counts and widths in."""
        return MOE_CONFIG[self.model_type]

    @property
    def routing(self) -> Routing:
        return self.fields.routing


def _glm4_moe_from_parent(parent: dict) -> dict:
    """GLM-4.5's attention options that the parent's family decides (vLLM reads head_dim)."""
    return {"head_dim": parent.get("head_dim") or parent["hidden_size"] // parent["num_attention_heads"],
            "use_qk_norm": parent["model_type"] == "qwen3",
            "attention_bias": parent["model_type"] == "qwen2" or parent.get("attention_bias", False)}


_EXPERTS = PerExpert("model.layers.{i}.mlp.experts.{e}.{proj}.weight")
_ROUTER = "model.layers.{i}.mlp.gate.weight"
_SHARED_EXPERTS = PerExpert("model.layers.{i}.mlp.shared_experts.{proj}.weight")
_GRANITE_ROUTER = "model.layers.{i}.block_sparse_moe.router.layer.weight"
_GRANITE_EXPERTS = Fused("model.layers.{i}.block_sparse_moe.input_linear.weight",
                         "model.layers.{i}.block_sparse_moe.output_linear.weight")

TARGETS: dict[str, Target] = {t.model_type: t for t in [
    Target("mixtral", "MixtralForCausalLM", ("llama", "mistral"),
           router="model.layers.{i}.block_sparse_moe.gate.weight",
           experts=PerExpert("model.layers.{i}.block_sparse_moe.experts.{e}.{proj}.weight",
                             {"gate": "w1", "up": "w3", "down": "w2"}),
           from_parent=lambda parent: {"sliding_window": parent.get("sliding_window")},  # the class default differs
           parent_requires={"attention_bias": False, "mlp_bias": False}),
    # A Llama/Mistral parent has no q/k/v biases: the upcycle writes zero ones (QKV_BIAS), which add nothing.
    Target("qwen2_moe", "Qwen2MoeForCausalLM", ("qwen2", "llama", "mistral"),
           router=_ROUTER, experts=_EXPERTS,
           shared=PerExpert("model.layers.{i}.mlp.shared_expert.{proj}.weight"),
           shared_gate="model.layers.{i}.mlp.shared_expert_gate.weight", shared_range=(1, 1),
           config={"norm_topk_prob": True, "qkv_bias": True}, softmax_topk=True, untie=True,
           parent_requires={"attention_bias": False, "mlp_bias": False}),
    Target("qwen3_moe", "Qwen3MoeForCausalLM", ("qwen3",), router=_ROUTER, experts=_EXPERTS,
           config={"norm_topk_prob": True}, softmax_topk=True),
    Target("glm4_moe", "Glm4MoeForCausalLM", ("llama", "mistral", "qwen2", "qwen3"),
           router=_ROUTER, experts=_EXPERTS, router_bias="model.layers.{i}.mlp.gate.e_score_correction_bias",
           shared=_SHARED_EXPERTS, shared_range=(1, 8),
           config={"norm_topk_prob": True, "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1,
                   "partial_rotary_factor": 1.0, "num_nextn_predict_layers": 0},
           from_parent=_glm4_moe_from_parent, untie=True),
    Target("flex_olmo", "FlexOlmoForCausalLM", ("olmo2",), router=_ROUTER, experts=_EXPERTS,
           config={"norm_topk_prob": True}, softmax_topk=True, untie=True),
    Target("granitemoe", "GraniteMoeForCausalLM", ("granite",),
           router=_GRANITE_ROUTER, experts=_GRANITE_EXPERTS, parent_requires={"mlp_bias": False}),
    Target("granitemoeshared", "GraniteMoeSharedForCausalLM", ("granite",),
           router=_GRANITE_ROUTER, experts=_GRANITE_EXPERTS,
           shared=Fused("model.layers.{i}.shared_mlp.input_linear.weight",
                        "model.layers.{i}.shared_mlp.output_linear.weight", expert_axis=False),
           shared_range=(1, 1), parent_requires={"mlp_bias": False}),
    # Read (split, add experts), never an upcycle target: see WHY_NOT.
    Target("olmoe", "OlmoeForCausalLM", (), router=_ROUTER, experts=_EXPERTS),
    *(Target(model_type, architecture, (), router=_ROUTER, experts=_EXPERTS,
             router_bias="model.layers.{i}.mlp.gate.e_score_correction_bias",
             shared=_SHARED_EXPERTS, shared_range=(1, 8))
      for model_type, architecture in (("deepseek_v3", "DeepseekV3ForCausalLM"), ("dots1", "Dots1ForCausalLM"))),
]}

# The natural target of each dense family.
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
