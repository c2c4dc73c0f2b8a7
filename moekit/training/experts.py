"""Fast fused experts for training (transformers 5.x) and activation checkpointing."""

from __future__ import annotations

from typing import Callable

import torch

from moekit.errors import MoekitError, UsageError
from moekit.runtime.moe import moe_layers
from moekit.runtime.transformers_private import (experts_functions, experts_implementation,
                                                 rename_experts_implementation, set_experts_implementation)


LOW_PRECISION_SUFFIX = "_autocast"


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


def use_experts_implementation(model, implementation: str = "grouped_mm") -> str:
    """Run the model's fused experts (transformers 5.x) through `implementation` (grouped_mm,
    batched_mm or eager), with their weights cast to bf16 under autocast; returns what runs, for
    the log. transformers 4.x has no such choice: one module per expert, looped in Python, whose
    nn.Linear layers autocast already runs in bf16."""
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
    if implementation not in functions:
        raise UsageError(f"--experts-implementation {implementation!r}: this transformers knows eager, "
                         + ", ".join(sorted(functions)))
    try:  # transformers checks that it can run here (grouped_mm: a recent torch, SM80+ on CUDA)
        set_experts_implementation(model, implementation)
    except (ValueError, ImportError) as e:
        raise MoekitError(f"--experts-implementation {implementation}: {' '.join(str(e).split())[:200]}") from None
    name = implementation + LOW_PRECISION_SUFFIX
    if name not in functions:
        functions.register(name, _autocast_experts(functions[implementation]))
    rename_experts_implementation(model, implementation, name)  # the same function behind the cast
    return f"{implementation} (expert weights cast to the autocast dtype)"


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing, non-reentrant: each layer's forward runs again inside
    backward, which RoutingCounter recognises and does not count twice."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
