"""Reading MoE checkpoints in the layouts of `moekit.arch.targets`: one layer's experts and router,
whoever wrote the checkpoint, and the walk that replaces each MoE block of a source."""

from __future__ import annotations

from functools import lru_cache

import torch

from moekit.checkpoint import Checkpoint, OutputTensor, passthrough
from moekit.errors import MoekitError
from moekit.arch.targets import TARGETS, Target


def source_target(ckpt: Checkpoint) -> Target:
    model_type = ckpt.config.get("model_type")
    if model_type not in TARGETS:
        raise MoekitError(f"this command reads the MoE layouts moekit writes ({', '.join(TARGETS)}); "
                          f"{ckpt.path} is {model_type!r}")
    return TARGETS[model_type]


def replace_blocks(ckpt: Checkpoint, owner: dict[str, int], dtype, plan_block) -> list[OutputTensor]:
    """The output tensors in the source's order: a tensor of no MoE block passes through; the
    tensors of block i (owner maps their names to i) give way, where the first of them stood, to
    `plan_block(i)`."""
    outputs, done = [], set()
    for meta in ckpt.tensors.values():
        i = owner.get(meta.name)
        if i is None:
            outputs.append(passthrough(ckpt, meta, dtype))
        elif i not in done:
            done.add(i)
            outputs += plan_block(i)
    return outputs


class ExpertReader:
    """One layer's experts and router from a checkpoint in a target's layout."""

    def __init__(self, ckpt: Checkpoint, target: Target, n: int):
        self.ckpt, self.t, self.n = ckpt, target, n
        self.load = lru_cache(maxsize=4)(ckpt.load)

    def names(self, i: int) -> set[str]:
        t = self.t
        names = {t.router.format(i=i)} | ({t.router_bias.format(i=i)} if t.router_bias else set())
        return names | set(t.experts.names(i, self.n))

    def projection(self, i: int, e: int, proj: str) -> torch.Tensor:
        """One of expert e's matrices: gate or up [I, H], down [H, I]."""
        return self.t.experts.read(self.load, i, e, proj)

    def tensor_name(self, i: int, e: int, proj: str) -> str | None:
        """The tensor that holds exactly this matrix (per-expert layouts), else None."""
        return self.t.experts.tensor_name(i, e, proj)
