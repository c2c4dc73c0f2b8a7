"""Fast fused experts for training (transformers 5.x) and activation checkpointing."""

from __future__ import annotations

from typing import Callable

import torch

from moekit.errors import MoekitError, UsageError
from moekit.runtime.moe import moe_layers
from moekit.runtime.transformers_private import (experts_functions, experts_implementation, plain_fused_experts,
                                                 rename_experts_implementation, set_experts_implementation)


LOW_PRECISION_SUFFIX = "_autocast"
SORTED = "moekit_grouped_mm"  # moekit's own experts function, the default for training


def sorted_grouped_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    """The plain SwiGLU experts (`plain_fused_experts`) for training: the T·K (token, expert) slots
    sorted by expert, two grouped matmuls, each slot's output times its routing weight added back
    to its token in fp32, as transformers' functions add them.

    Written for speed against transformers' grouped_mm function (5.17 and 5.24), which it matches
    to rounding (tests/test_training.py): the [T, H] input and the weights are cast to the autocast
    dtype once, before the gather, not the [T·K, H] gathered rows after it; the gather is an
    `index_select` and the combine an `index_add`, whose backward passes are a scatter-add and a
    gather (advanced indexing's backward sorts the indices); the gate and up projections are two
    matmuls, not one split in half, so the activation and its backward run on contiguous tensors
    (vectorised kernels: 6 ms a step less on the H200 benchmark); and there are no masks for expert
    parallelism's "no expert" slots (moekit trains data-parallel; 5.17 masks every call). With
    K = 2 the scatter-adds are deterministic too: two addends into zero commute exactly."""
    n, k = self.num_experts, top_k_index.shape[-1]
    device = hidden_states.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.gate_up_proj.dtype
    expert = top_k_index.reshape(-1)
    order = torch.argsort(expert)
    token = order // k  # slot s of the flat [T·K] list belongs to token s // K
    sizes = torch.zeros(n, dtype=torch.int32, device=expert.device).scatter_add_(
        0, expert, torch.ones_like(expert, dtype=torch.int32))  # not bincount: no wait for the GPU
    offsets = sizes.cumsum(0, dtype=torch.int32)
    grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    rows = hidden_states.to(dtype).index_select(0, token)
    gate_weight, up_weight = self.gate_up_proj.to(dtype).chunk(2, dim=1)  # [N, I, H] each
    gate = grouped_mm(rows, gate_weight.transpose(1, 2), offs=offsets)
    up = grouped_mm(rows, up_weight.transpose(1, 2), offs=offsets)
    out = grouped_mm(self.act_fn(gate) * up, self.down_proj.to(dtype).transpose(1, 2), offs=offsets)
    weighted = out * top_k_weights.reshape(-1).index_select(0, order).float().unsqueeze(-1)  # fp32
    total = torch.zeros(hidden_states.shape[0], out.shape[-1], dtype=torch.float32, device=out.device)
    return total.index_add(0, token, weighted).to(hidden_states.dtype)


class _CastExperts:
    """An experts module seen through a cast: its floating parameters read in `dtype`, everything
    else (config, gate function, flags) as it is. The cast is differentiable, so the fp32
    parameters get their gradient in fp32, as autocast gives every nn.Linear."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        self._module, self._dtype = module, dtype

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if isinstance(value, torch.nn.Parameter) and value.is_floating_point():
            return value.to(self._dtype)
        return value


def _autocast_experts(forward: Callable) -> Callable:
    """transformers' experts function `forward`, with the expert weights cast to the autocast dtype
    while autocast is on. transformers' grouped_mm is not autocast-enabled and casts the input to
    the weight's dtype: with fp32 master weights every expert matmul would run in fp32."""

    def run(self, hidden_states, *args, **kwargs):
        device = hidden_states.device.type
        if torch.is_autocast_enabled(device):
            self = _CastExperts(self, torch.get_autocast_dtype(device))
        return forward(self, hidden_states, *args, **kwargs)

    return run


def use_experts_implementation(model, implementation: str = SORTED) -> str:
    """Run the model's fused experts (transformers 5.x) through `implementation`: moekit's own
    `sorted_grouped_experts` (the plain SwiGLU layout; others fall back to grouped_mm), or one of
    transformers' (grouped_mm, batched_mm, eager) with its weights cast to bf16 under autocast.
    Returns what runs, for the log. transformers 4.x has no such choice: one module per expert,
    looped in Python, whose nn.Linear layers autocast already runs in bf16."""
    functions = experts_functions()
    layers = moe_layers(model)
    if not layers:
        return "none (a dense model)"
    fused = not any(isinstance(layer.experts, torch.nn.ModuleList) for layer in layers)
    if functions is None or not fused or experts_implementation(model.config) is None:
        return "eager (one module per expert, transformers 4.x)"
    if implementation == "eager":
        set_experts_implementation(model, "eager")
        return "eager"
    ours = implementation == SORTED and all(plain_fused_experts(layer.experts) for layer in layers)
    checked = "grouped_mm" if implementation == SORTED else implementation  # ours needs what grouped_mm needs
    if checked not in functions:
        raise UsageError(f"--experts-implementation {implementation!r}: this transformers knows {SORTED}, eager, "
                         + ", ".join(sorted(functions)))
    try:  # transformers checks that it can run here (grouped_mm: a recent torch, SM80+ on CUDA)
        set_experts_implementation(model, checked)
    except (ValueError, ImportError) as e:
        raise MoekitError(f"--experts-implementation {implementation}: {' '.join(str(e).split())[:200]}") from None
    name, forward = (SORTED, sorted_grouped_experts) if ours else (
        checked + LOW_PRECISION_SUFFIX, _autocast_experts(functions[checked]))
    if name not in functions:
        functions.register(name, forward)
    rename_experts_implementation(model, checked, name)
    if ours:
        return f"{SORTED} (moekit's sorted grouped matmuls, bf16 under autocast)"
    fallback = " in place of moekit_grouped_mm (not the plain SwiGLU layout)" if implementation == SORTED else ""
    return f"{checked} (expert weights cast to the autocast dtype){fallback}"


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant: each layer's forward runs again inside
    backward, which RoutingCounter recognises and does not count twice."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
