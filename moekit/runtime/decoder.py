"""Where a transformers causal LM keeps its decoder stack, and one pass through it."""

from __future__ import annotations

import torch


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.model.layers


def ffn_of(layer: torch.nn.Module) -> torch.nn.Module | None:
    """A decoder layer's FFN: `mlp` (dense models, and MoE models in transformers 5.x, Qwen, GLM,
    DeepSeek) or `block_sparse_moe` (4.57 Mixtral, GraniteMoe); its input is the same either way."""
    return getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)


def input_device(model) -> torch.device:
    """Where token ids go: the embedding's device (the first GPU under device_map="auto")."""
    return model.get_input_embeddings().weight.device


def run_decoder(model, input_ids: torch.Tensor) -> None:
    """One forward pass of the decoder stack on `input_ids` (no LM head: the hooks that read the
    layers do not need the logits of a large vocabulary)."""
    model.model(input_ids=input_ids, use_cache=False)
