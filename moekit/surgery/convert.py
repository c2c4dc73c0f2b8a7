"""The identity surgery: every tensor as it is, optionally cast."""

from __future__ import annotations

import torch

from moekit.checkpoint import Checkpoint, OutputTensor, passthrough


def plan_convert(ckpt: Checkpoint, dtype: torch.dtype | None) -> list[OutputTensor]:
    return [passthrough(ckpt, meta, dtype) for meta in ckpt.tensors.values()]
