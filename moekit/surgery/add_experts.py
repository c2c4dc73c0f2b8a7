"""Add experts to an MoE model for a new data distribution (Lifelong-MoE, MoE-LPR).

New experts are appended after the old ones (old expert ids never move), their router rows are
appended, and everything that existed is listed as frozen in a freeze manifest that
`moekit train` applies. Pure tensor logic, like the other surgeries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from moekit.arch.families import read_field
from moekit.checkpoint import Checkpoint, OutputTensor, TensorMeta, passthrough
from moekit.errors import UsageError
from moekit.surgery.layout import ExpertReader, source_target
from moekit.surgery.requirements import model_shape, moe_layer_indices
from moekit.surgery.upcycle import perturb
from moekit.arch.layouts import PROJS
from moekit.arch.targets import Target

INITS = ("copy", "mean", "random", "drop-upcycling")
ROUTER_INITS = ("copy", "kmeans", "zero")


@dataclass(frozen=True)
class GrowPlan:
    outputs: list[OutputTensor]
    config: dict
    layers: list[dict]
    target: Target
    freeze: dict  # the manifest `moekit train` applies
    old_experts: int
    experts: int
    top_k: int


def donors(how: str, usage: torch.Tensor | None, n: int, m: int) -> list[int]:
    """Which old expert each of the m new experts is copied from."""
    if how in ("most-used", "least-used"):
        order = torch.argsort(usage, descending=how == "most-used", stable=True).tolist()
        return [order[j % n] for j in range(m)]
    try:
        expert = int(how)
    except ValueError:
        raise UsageError(f"--copy-from takes most-used, least-used or an expert id, got {how!r}") from None
    if not 0 <= expert < n:
        raise UsageError(f"--copy-from {expert}: the model has experts 0-{n - 1}")
    return [expert] * m


def plan_add_experts(ckpt: Checkpoint, m: int, *, init: str = "copy", copy_from: str = "most-used",
                     router_init: str = "copy", top_k: int | None = None, drop: float = 0.5, seed: int = 0,
                     usage: Callable[[list[int]], dict[int, torch.Tensor]] | None = None,
                     kmeans_rows: Callable[[list[int]], dict[int, torch.Tensor]] | None = None,
                     dtype: torch.dtype | None = None) -> GrowPlan:
    cfg = ckpt.config
    target = source_target(ckpt)
    fields = target.fields
    model_shape(ckpt, [fields.expert_fields, fields.expert_width, "num_experts_per_tok"])  # numbers, before arithmetic
    n, k = read_field(cfg, fields.expert_fields), cfg["num_experts_per_tok"]
    if m < 1:
        raise UsageError(f"--new-experts must be at least 1, got {m}")
    if init not in INITS:
        raise UsageError(f"unknown --init {init!r} (known: {', '.join(INITS)})")
    if router_init not in ROUTER_INITS:
        raise UsageError(f"unknown --router-init {router_init!r} (known: {', '.join(ROUTER_INITS)})")
    if (cfg.get("n_group") or 1) > 1:
        raise UsageError(f"group-limited routing (n_group {cfg['n_group']}): groups are contiguous ranges of expert "
                         "ids, so appended experts would move old experts into other groups")
    new_k = k if top_k is None else top_k
    if not 1 <= new_k <= n + m:
        raise UsageError(f"--top-k must be between 1 and {n + m}, got {new_k}")
    layers = moe_layer_indices(ckpt, target)
    needs_usage = copy_from in ("most-used", "least-used") and init in ("copy", "drop-upcycling")
    if needs_usage and usage is None:
        raise UsageError(f"--copy-from {copy_from} needs routing counts: give --profile or --calibration")
    counts = usage(layers) if needs_usage else {}
    rows = kmeans_rows(layers) if router_init == "kmeans" else {}

    reader = ExpertReader(ckpt, target, n)
    out_dtype = dtype or ckpt.meta(target.router.format(i=layers[0])).dtype
    width, hidden = cfg[fields.expert_width], cfg["hidden_size"]

    def old(i: int, e: int, p: str) -> torch.Tensor:
        return reader.projection(i, e, p).to(out_dtype)

    def new(i: int, j: int, p: str, donor: list[int]) -> torch.Tensor:
        gen_seed = (seed * 1_000_003 + i) * 1009 + n + j
        if init == "mean":
            return torch.stack([reader.projection(i, e, p).float() for e in range(n)]).mean(0).to(out_dtype)
        if init == "random":  # the spread of the old experts' weights, no structure
            ref = torch.stack([reader.projection(i, e, p).float() for e in range(n)])
            gen = torch.Generator().manual_seed(gen_seed * 7 + PROJS.index(p))
            return (torch.randn(ref.shape[1:], generator=gen) * ref.std()).to(out_dtype)
        w = old(i, donor[j], p)
        return perturb(w, p, 0.0, drop, gen_seed).to(out_dtype) if init == "drop-upcycling" else w

    def router(i: int, donor: list[int]) -> torch.Tensor:
        w = reader.load(target.router.format(i=i)).float()
        if router_init == "kmeans":  # calibrated against the old rows by the caller (moekit.jobs.add_experts)
            added = rows[i].cpu().float()
        elif router_init == "zero":
            added = torch.zeros(m, hidden)
        elif init in ("copy", "drop-upcycling"):
            added = w[donor]
        else:  # a mean expert (or a random one) gets the mean of the old rows
            added = w.mean(0, keepdim=True).expand(m, -1)
        return torch.cat([w, added]).to(out_dtype)

    owner = {name: i for i in layers for name in reader.names(i)}
    outputs, records, done = [], [], set()
    tensors: dict[str, object] = {}
    for meta in ckpt.tensors.values():
        i = owner.get(meta.name)
        if i is None:
            outputs.append(passthrough(ckpt, meta, dtype))
            tensors[meta.name] = "frozen"
            continue
        if i in done:
            continue
        done.add(i)
        donor = donors(copy_from, counts.get(i), n, m) if init in ("copy", "drop-upcycling") else []

        def verbatim(e: int, p: str, i=i, donor=donor) -> tuple[Checkpoint, str] | None:
            """Old experts, and new copies of one, are byte-for-byte source tensors."""
            source = e if e < n else (donor[e - n] if init == "copy" else None)
            name = None if source is None else reader.tensor_name(i, source, p)
            return (ckpt, name) if name and ckpt.meta(name).dtype == out_dtype else None

        block = _grown_block(target, i, n, m, width, hidden, out_dtype, reader, old, new, router, donor, verbatim)
        outputs += block
        for o in block:
            tensors[o.meta.name] = _freeze_rule(target, o.meta.name, i, n)
        records.append({"layer": i, "old_experts": n, "new_experts": m, "init": init, "router_init": router_init,
                        "copied_from": donor or None})
    config = dict(cfg)
    config.update({f: n + m for f in fields.expert_fields})
    config["num_experts_per_tok"] = new_k
    freeze = {"format": 1, "moe_layers": {str(i): {"old_experts": n, "new_experts": m} for i in layers}, "tensors": tensors}
    return GrowPlan(outputs, config, records, target, freeze, n, n + m, new_k)


def _freeze_rule(t: Target, name: str, i: int, n: int):
    """Old experts and old router rows frozen, new ones trainable; the selection bias is a buffer."""
    if name == t.router.format(i=i) or name in t.experts.row_tensors(i):
        return {"frozen_rows": [0, n]}
    e = t.experts.expert_of(name)
    return "trainable" if e is not None and e >= n else "frozen"


def _grown_block(t: Target, i, n, m, width, hidden, dtype, reader, old, new, router, donor, verbatim) -> list[OutputTensor]:
    name = t.router.format(i=i)
    block = [OutputTensor(TensorMeta(name, (n + m, hidden), dtype), lambda: router(i, donor))]
    if t.router_bias:  # new experts start with the bias of the expert they copy (or the mean bias)
        bias = t.router_bias.format(i=i)

        def grown_bias():
            b = reader.load(bias).float()
            return torch.cat([b, b[donor] if donor else b.mean().expand(m)])

        block.append(OutputTensor(TensorMeta(bias, (n + m,), torch.float32), grown_bias))

    def expert(e: int, p: str) -> torch.Tensor:
        return old(i, e, p) if e < n else new(i, e - n, p, donor)

    return block + t.experts.emit(i, n + m, width, hidden, dtype, expert, copy=lambda e, p: {"copy_of": verbatim(e, p)})
