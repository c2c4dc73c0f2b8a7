"""Reading MoE checkpoints in the layouts of `moekit.targets`: which layers are MoE, and one
layer's experts and router, whoever wrote the checkpoint."""

from __future__ import annotations

from functools import lru_cache

import torch

from moekit.checkpoint import Checkpoint, OutputTensor, passthrough
from moekit.errors import MoekitError
from moekit.targets import PROJS, TARGETS, Target


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


def moe_layer_indices(ckpt: Checkpoint, target: Target) -> list[int]:
    """The layers that hold a router, once every one of them is checked to hold what an MoE layer
    of the target needs (and no layer holds experts without a router)."""
    from moekit.surgery.requirements import check_moe, model_shape

    n_layers = model_shape(ckpt).num_hidden_layers
    layers = [i for i in range(n_layers) if target.router.format(i=i) in ckpt.tensors]
    experts = (target.expert or target.fused_gate_up).split("{e}")[0]
    for i in set(range(n_layers)) - set(layers):
        prefix = experts.format(i=i)
        if any(name.startswith(prefix) for name in ckpt.tensors):
            raise MoekitError(f"{ckpt.path}: layer {i} holds experts but no router ({target.router.format(i=i)}); "
                              "the checkpoint is incomplete")
    if not layers:
        raise MoekitError(f"{ckpt.path} has no MoE layers in the {target.model_type} layout")
    check_moe(ckpt, target, layers)
    return layers


class ExpertReader:
    """One layer's experts and router from a checkpoint in a target's layout."""

    def __init__(self, ckpt: Checkpoint, target: Target, n: int):
        self.ckpt, self.t, self.n = ckpt, target, n
        self.load = lru_cache(maxsize=4)(ckpt.load)

    def names(self, i: int) -> set[str]:
        t = self.t
        names = {t.router.format(i=i)} | ({t.router_bias.format(i=i)} if t.router_bias else set())
        if t.expert:
            names |= {t.expert.format(i=i, e=e, proj=t.proj[p]) for e in range(self.n) for p in PROJS}
        else:
            names |= {t.fused_gate_up.format(i=i), t.fused_down.format(i=i)}
        return names

    def expert(self, i: int, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, H], up [I, H], down [H, I]) of expert e in layer i."""
        return tuple(self.projection(i, e, p) for p in PROJS)

    def projection(self, i: int, e: int, proj: str) -> torch.Tensor:
        """One of expert e's matrices: gate or up [I, H], down [H, I]."""
        t = self.t
        if t.expert:
            return self.load(self.tensor_name(i, e, proj))
        if proj == "down":
            return self.load(t.fused_down.format(i=i))[e]
        return self.load(t.fused_gate_up.format(i=i))[e].chunk(2)[PROJS.index(proj)]

    def tensor_name(self, i: int, e: int, proj: str) -> str | None:
        """The tensor that holds exactly this matrix (per-expert layouts), else None."""
        return self.t.expert.format(i=i, e=e, proj=self.t.proj[proj]) if self.t.expert else None
