"""Every use of transformers internals in moekit: private modules, private attributes and the
shapes of values that transformers' modules pass between them, none of them public API.

Each is wrapped in one small function, with the transformers versions it was checked on: the
5.x line (5.24 here) and 4.57.6, the two lines moekit's outputs load in. A new transformers that
moves one of them breaks here, in one place.
"""

from __future__ import annotations

import torch


def to_disk_names(model, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` (runtime name -> tensor) renamed and split the way `save_pretrained` writes them:
    5.x fuses per-expert tensors on load (`experts.*.w1` + `w3` -> `experts.gate_up_proj`,
    `block_sparse_moe` -> `mlp`) and its `revert_weight_conversion` undoes that on save, for every
    family it knows. 4.x keeps the disk names at run time.
    Checked on 5.24 (`transformers.core_model_loading`) and 4.57.6 (absent)."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4.x
        return tensors
    return revert_weight_conversion(model, tensors)


def no_init_weights():
    """A context in which `from_config` skips random initialisation.
    Checked on 5.24 (`transformers.initialization`) and 4.57.6 (`transformers.modeling_utils`)."""
    try:  # transformers 5.x
        from transformers.initialization import no_init_weights as skip
    except ImportError:  # 4.57
        from transformers.modeling_utils import no_init_weights as skip
    return skip()


def set_loss_is_batch_mean(trainer) -> None:
    """Tell `Trainer` that `compute_loss` returns a per-batch mean, not a sum normalised by the token
    count of the whole accumulated batch: Trainer then divides by the gradient-accumulation steps
    itself. Checked on 5.24 and 4.57.6 (`Trainer.model_accepts_loss_kwargs`, set in `__init__`)."""
    trainer.model_accepts_loss_kwargs = False


def router_output(output) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits, chosen experts) from what an MoE block's router module returns; None for what it
    does not return. Checked on 5.24 and 4.57.6, every family of `architectures.MOE_CONFIG`."""
    if isinstance(output, torch.Tensor):  # 4.57 Mixtral, Qwen-MoE, OLMoE: the gate is an nn.Linear
        return output, None
    if len(output) == 3:  # 5.x routers: (logits, weights, indices)
        return output[0], output[2]
    if len(output) == 5:  # 4.57 GraniteMoe gating: (sorted index, batch index, gates, sizes, logits)
        return output[4], None
    # 4.57 DeepSeek-V3 / GLM / dots1 return (indices, weights), GPT-OSS (scores, indices): no logits
    return None, next(o for o in output if not o.is_floating_point())


_EXPERTS_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def experts_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden states, chosen experts, their weights) from a call of 5.x's fused experts module,
    `experts(hidden_states, top_k_index, top_k_weights)`, positional or by keyword (read by a
    forward pre-hook `with_kwargs`). Checked on 5.24; 4.57.6 has one module per expert instead."""
    return (*args, *(kwargs[k] for k in _EXPERTS_ARGS[len(args):]))[:3]


def experts_functions():
    """5.x's registry of fused-experts implementations (grouped_mm, batched_mm, ...), or None.
    Checked on 5.24 (`transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`) and 4.57.6 (absent)."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return None
    return ALL_EXPERTS_FUNCTIONS


def experts_implementation(config) -> str | None:
    """The experts implementation a config selects (None where transformers has no such choice).
    Checked on 5.24 (`config._experts_implementation`) and 4.57.6 (absent)."""
    return getattr(config, "_experts_implementation", None)


def set_experts_implementation(model, name: str) -> None:
    """Select the fused-experts implementation `name`; transformers checks that it can run here
    (ValueError / ImportError). Checked on 5.24 (`set_experts_implementation`); early 5.x had only
    the config property, which reaches the sub-configs."""
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        setter(name)
    else:
        model.config._experts_implementation = name


def rename_experts_implementation(model, old: str, new: str) -> None:
    """Point every config of `model` that selects experts implementation `old` at `new` (a function
    registered under that name in `experts_functions()`), without transformers' checks of a name
    it does not know. Checked on 5.24: each experts module reads its own config's attribute."""
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        if experts_implementation(config) == old:
            config._experts_implementation = new


def plain_fused_experts(experts) -> bool:
    """Whether a 5.x fused experts module has the plain SwiGLU layout: `gate_up_proj` [N, 2I, H]
    with the gate rows first, `down_proj` [N, H, I], no biases, no post-expert norm and the default
    gate `act_fn(gate) * up` (not GPT-OSS's). Checked on 5.24 (the flags that
    `integrations.moe.use_experts_implementation` sets on the class)."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # 4.x, or a 5.x that moved it: transformers' own functions run instead
        return False
    return (isinstance(getattr(experts, "gate_up_proj", None), torch.Tensor) and getattr(experts, "has_gate", False)
            and not getattr(experts, "has_bias", True) and not getattr(experts, "is_transposed", True)
            and getattr(experts, "is_concatenated", True) and not getattr(experts, "has_post_expert_norm", False)
            and getattr(type(experts), "_apply_gate", None) is _default_apply_gate)
