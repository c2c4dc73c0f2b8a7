"""Fine-grained split: each expert of width I becomes G experts of width I/G, function preserved.

Expert e's SwiGLU computes down(act(gate x) ⊙ up x) = Σ_g down[:, S_g](act(gate[S_g] x) ⊙ up[S_g] x)
for any partition {S_g} of its neurons. Child g of parent e is slice S_g; its router row is the
parent's row (children of a parent are adjacent: ids e·G .. e·G+G-1), top-k becomes K·G, and the
child's down projection is scaled by `child_weight_factor` so routing weights add up as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

from moekit.arch.families import child_weight_factor, read_field
from moekit.checkpoint import Checkpoint, OutputTensor, TensorMeta
from moekit.errors import UsageError
from moekit.surgery import partition
from moekit.surgery.layout import ExpertReader, replace_blocks, source_target
from moekit.surgery.requirements import model_shape, moe_layer_indices
from moekit.arch.targets import Target


@dataclass(frozen=True)
class SplitPlan:
    outputs: list[OutputTensor]
    config: dict
    layers: list[dict]
    target: Target
    experts: int  # after the split
    top_k: int
    factor: float
    exact: bool


def divisors(width: int) -> list[int]:
    return [d for d in range(2, width + 1) if width % d == 0]


def plan_split(ckpt: Checkpoint, granularity: int, *, top_k: int | None = None, method: str = "contiguous",
               hidden_states: Callable[[list[int]], dict[int, torch.Tensor]] | None = None, seed: int = 0,
               dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> SplitPlan:
    cfg, G = ckpt.config, granularity
    target = source_target(ckpt)
    fields = target.fields
    model_shape(ckpt, [fields.expert_fields, fields.expert_width, "num_experts_per_tok"])  # numbers, before arithmetic
    n, k = read_field(cfg, fields.expert_fields), cfg["num_experts_per_tok"]
    width = cfg[fields.expert_width]
    if G < 2:
        raise UsageError(f"--granularity must be at least 2, got {G}")
    if width % G:
        raise UsageError(f"--granularity {G} does not divide the expert width {width}; "
                         f"widths that work: {', '.join(map(str, divisors(width)[:12]))}"
                         + (", ..." if len(divisors(width)) > 12 else ""))
    new_k = k * G if top_k is None else top_k
    if not 1 <= new_k <= n * G:
        raise UsageError(f"--top-k must be between 1 and {n * G} experts after the split, got {new_k}")
    if cfg.get("n_group", 1) > 1 and cfg.get("topk_group", 1) < cfg["n_group"]:
        raise UsageError(f"group-limited routing (n_group {cfg['n_group']}, topk_group {cfg['topk_group']}) scores a group "
                         "by its best experts, which G identical children would change; not exact")
    if method not in partition.METHODS:
        raise UsageError(f"unknown --partition {method!r} (known: {', '.join(partition.METHODS)})")
    if method == "coactivation" and not hidden_states:
        raise UsageError("--partition coactivation needs calibration hidden states")

    reader = ExpertReader(ckpt, target, n)
    moe_layers = moe_layer_indices(ckpt, target)
    states = hidden_states(moe_layers) if method == "coactivation" else {}  # forward passes: options are valid now
    factor = child_weight_factor(target.routing, cfg, G)
    out_dtype = dtype or ckpt.meta(target.router.format(i=moe_layers[0])).dtype
    child, hidden = width // G, cfg["hidden_size"]

    @lru_cache(maxsize=None)  # each clustered once: the layer records list them all at plan time
    def permutation(i: int, e: int) -> torch.Tensor:
        if method == "contiguous":
            return partition.contiguous(width, G)
        if method == "random":
            return partition.random(width, G, seed=seed * 1_000_003 + i * 1009 + e)
        gate, up = (reader.projection(i, e, p).to(device) for p in ("gate", "up"))  # clustering runs on the GPU when there is one
        if method == "kmeans":
            return partition.kmeans(gate, up, G, seed=seed + i).cpu()
        return partition.coactivation(gate, up, states[i], G, seed=seed + i).cpu()

    @lru_cache(maxsize=3)
    def laid_out(i: int, e: int, proj: str) -> torch.Tensor:
        """One of expert e's matrices in partition order and the output dtype, laid out so that
        every child is a contiguous slice: gate/up rows as they are, down as [G, H, I/G] blocks.
        One gather, copy and cast per expert and matrix, not per child."""
        w = reader.projection(i, e, proj)
        if method != "contiguous":
            perm = permutation(i, e)
            w = w[:, perm] if proj == "down" else w[perm]
        return down_blocks(w) if proj == "down" else w.to(out_dtype)

    def down_blocks(down: torch.Tensor) -> torch.Tensor:
        columns = down.reshape(hidden, G, child).transpose(0, 1)  # block g = child g's columns
        blocks = torch.empty((G, hidden, child), dtype=out_dtype)
        if factor == 1.0:
            return blocks.copy_(columns)
        if down.dtype == out_dtype and math.log2(factor).is_integer():
            return blocks.copy_(columns).mul_(factor)  # exact: a power of two only moves the exponent
        # the factor goes on the output side (act(gate x) is not homogeneous); one rounding
        return blocks.copy_(columns.float() * factor)

    def child_tensor(i: int, e: int, g: int, proj: str) -> torch.Tensor:
        w = laid_out(i, e, proj)
        return w[g] if proj == "down" else w[g * child:(g + 1) * child]

    def child_rows(i: int, e: int, g: int, proj: str) -> dict:
        """The gate/up children of a contiguous split are row ranges of the parent's tensors, byte
        for byte when the dtype stays: the writer copies them file to file."""
        name = reader.tensor_name(i, e, proj)
        if method != "contiguous" or proj == "down" or name is None or ckpt.meta(name).dtype != out_dtype:
            return {}
        return {"copy_of": (ckpt, name), "rows": (g * child, (g + 1) * child)}

    block_names = {i: reader.names(i) for i in moe_layers}
    owner = {name: i for i, names in block_names.items() for name in names}
    layers = []

    def plan_block(i: int) -> list[OutputTensor]:
        block = _child_block(target, i, n, G, child, hidden, out_dtype, reader, child_tensor, child_rows)
        layers.append({"layer": i, "parents": n, "children": n * G, "granularity": G, "partition": method,
                       "factor": factor,
                       **({} if method == "contiguous" else {"permutations": {e: permutation(i, e).tolist() for e in range(n)}})})
        return block

    outputs = replace_blocks(ckpt, owner, dtype, plan_block)
    config = dict(cfg)
    config.update({f: n * G for f in fields.expert_fields})
    config[fields.expert_width] = child
    config["num_experts_per_tok"] = new_k
    if fields.shared_experts:  # GLM: shared width is moe_intermediate_size × count
        config[fields.shared_experts] = cfg[fields.shared_experts] * G
    return SplitPlan(outputs, config, layers, target, n * G, new_k, factor, exact=new_k == k * G)


def _child_block(t: Target, i, n, G, child, hidden, dtype, reader, child_tensor, child_rows) -> list[OutputTensor]:
    router = t.router.format(i=i)
    block = [OutputTensor(TensorMeta(router, (n * G, hidden), dtype),
                          lambda: reader.load(router).repeat_interleave(G, dim=0).to(dtype))]
    if t.router_bias:
        bias = t.router_bias.format(i=i)
        block.append(OutputTensor(TensorMeta(bias, (n * G,), torch.float32),
                                  lambda: reader.load(bias).float().repeat_interleave(G)))
    # child c = e·G + g is slice g of parent e
    return block + t.experts.emit(i, n * G, child, hidden, dtype, lambda c, p: child_tensor(i, *divmod(c, G), p),
                                  copy=lambda c, p: child_rows(i, *divmod(c, G), p))
