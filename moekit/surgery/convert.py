"""The identity surgery: every tensor as it is, optionally cast."""

from __future__ import annotations

from dataclasses import replace

import torch

from moekit.checkpoint import Checkpoint
from moekit.pipeline import OutputTensor


def plan_convert(ckpt: Checkpoint, dtype: torch.dtype | None) -> list[OutputTensor]:
    outputs = []
    for meta in ckpt.tensors.values():
        cast = dtype if dtype is not None and meta.dtype.is_floating_point else meta.dtype
        outputs.append(OutputTensor(replace(meta, dtype=cast), lambda n=meta.name, d=cast: ckpt.load(n, d)))
    return outputs
