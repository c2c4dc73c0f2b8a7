"""Dense → MoE upcycling as an output plan: every expert starts as a copy of the dense FFN.

Pure tensor logic: it reads tensors through a `Checkpoint` and returns `OutputTensor`s plus the
new config; it never touches files or the CLI.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch

from moekit.arch.families import holds_routed_experts
from moekit.checkpoint import Checkpoint, OutputTensor, TensorMeta, passthrough
from moekit.errors import MoekitError, UsageError
from moekit.arch.layouts import PROJS
from moekit.surgery.requirements import ModelShape, check_dense
from moekit.arch.targets import (DEFAULT_TARGET, DENSE_FFN, EMBED, LM_HEAD, NO_SOFTMAX_TOPK, QKV_BIAS, TARGETS, WHY_NOT,
                            Target)


@dataclass(frozen=True)
class UpcyclePlan:
    outputs: list[OutputTensor]
    config: dict
    layers: list[dict]
    target: Target
    moe_layers: list[int]
    exact: bool  # computes the parent's function (no noise, and a router the routing is exact with)
    notes: list[str]  # what the user should know about this output (one line each)


def choose_target(parent_type: str, requested: str | None) -> Target:
    if requested is None:
        if parent_type not in DEFAULT_TARGET:
            raise MoekitError(f"no upcycle for dense model_type {parent_type!r} (supported: {', '.join(DEFAULT_TARGET)})")
        requested = DEFAULT_TARGET[parent_type]
    if requested in WHY_NOT:
        raise UsageError(f"cannot upcycle into {requested}: {WHY_NOT[requested]}")
    if requested not in TARGETS:
        raise UsageError(f"unknown target {requested!r} (known: {', '.join(TARGETS)})")
    target = TARGETS[requested]
    if parent_type not in target.parents:
        raise UsageError(f"{parent_type} → {requested} is not exact; {requested} takes {', '.join(target.parents)} "
                         f"(default for {parent_type}: {DEFAULT_TARGET.get(parent_type, 'none')})")
    return target


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """`all`, `every:2` (layers 1,3,5..: Qwen's decoder_sparse_step), `0-3,20-29`, `skip-first:2,skip-last:2`."""
    spec = spec.strip().lower()
    chosen: set[int] = set(range(n_layers))
    try:
        if spec == "all":
            pass
        elif spec.startswith("every:"):
            step = int(spec.split(":")[1])
            if step < 1:
                raise ValueError(step)
            chosen = {i for i in range(n_layers) if (i + 1) % step == 0}
        elif spec.startswith("skip-"):
            for part in spec.split(","):
                kind, n = part.split(":")
                n = int(n)
                if n < 0:
                    raise ValueError(n)
                if kind == "skip-first":
                    chosen -= set(range(n))
                elif kind == "skip-last":
                    chosen -= set(range(n_layers - n, n_layers))
                else:
                    raise ValueError(kind)
        else:
            chosen = set()
            for part in spec.split(","):
                lo, _, hi = part.partition("-")
                chosen |= set(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UsageError(f"cannot read --moe-layers {spec!r}: use all, every:2, 0-3,20-29 or skip-first:2,skip-last:2") from None
    if not chosen or max(chosen) >= n_layers or min(chosen) < 0:
        raise UsageError(f"--moe-layers {spec!r} selects no layer, or one outside 0-{n_layers - 1}")
    return sorted(chosen)


def layer_config(target: Target, moe_layers: list[int], n_layers: int) -> dict:
    """The target's own fields that say which layers are MoE; refuse what it cannot say."""
    dense, fields = [i for i in range(n_layers) if i not in moe_layers], target.fields.moe_layers
    if not dense:
        return {"decoder_sparse_step": 1, "mlp_only_layers": []} if fields == "sparse_step" else (
            {"first_k_dense_replace": 0} if fields == "first_k" else {})
    if fields == "sparse_step":
        return {"decoder_sparse_step": 1, "mlp_only_layers": dense}
    if fields == "first_k" and dense == list(range(len(dense))):
        return {"first_k_dense_replace": len(dense)}
    how = {"first_k": "only its first k layers dense (skip-first:k)", "all": "every layer MoE"}[fields]
    raise UsageError(f"{target.model_type} can only have {how}; --moe-layers asks for dense layers {dense}")


def check_routing(target: Target, routing: str) -> None:
    if routing == "softmax-topk" and not target.softmax_topk:
        why = NO_SOFTMAX_TOPK.get(target.model_type, "it cannot turn renormalisation off")
        *others, last = [t.model_type for t in TARGETS.values() if t.softmax_topk and t.parents]
        raise UsageError(f"--routing softmax-topk needs {', '.join(others)} or {last}: {why}")
    if routing not in ("renormalised", "softmax-topk"):
        raise UsageError(f"unknown --routing {routing!r} (known: renormalised, softmax-topk)")


def softmax_topk_scale(n: int, k: int) -> float:
    """With a zero router, softmax over N experts gives each of the K picked ones weight 1/N, K/N
    in all; each expert's down_proj × N/K makes the sum of K identical experts the dense FFN."""
    return n / k


def build_config(parent: dict, target: Target, n: int, k: int, shared: int, d_ff: int, moe_layers: list[int],
                 routing: str = "renormalised") -> dict:
    """Edit the parent's own config dict (never re-serialise through transformers 5.x)."""
    cfg, fields = dict(parent), target.fields
    n_layers = parent["num_hidden_layers"]
    cfg.update(model_type=target.model_type, architectures=[target.architecture], num_experts_per_tok=k,
               output_router_logits=False)
    cfg.update({f: n for f in fields.expert_fields})
    cfg[fields.expert_width] = d_ff
    cfg.setdefault("intermediate_size", d_ff)  # dense layers keep the parent's FFN
    if fields.shared_experts:
        cfg[fields.shared_experts] = shared
    if fields.shared_width:
        cfg[fields.shared_width] = d_ff * shared
    cfg.update(target.config)
    if routing == "softmax-topk":
        cfg["norm_topk_prob"] = False
    cfg.update(layer_config(target, moe_layers, n_layers))
    if "partial_rotary_factor" in target.config and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"] = {**cfg["rope_parameters"], "partial_rotary_factor": target.config["partial_rotary_factor"]}
    if target.untie and parent.get("tie_word_embeddings"):
        cfg["tie_word_embeddings"] = False  # lm_head.weight is written out (see plan_upcycle)
    if target.from_parent:
        cfg.update(target.from_parent(parent))
    return cfg


def router_rows(init: str, n: int, hidden: int, gen: torch.Generator, std: float) -> torch.Tensor:
    """Router weights [N, H] for the data-free inits; data-driven ones come from router_init."""
    if init == "zero":  # every expert equal: top-k picks by index until training breaks ties
        return torch.zeros(n, hidden)
    if init == "uniform":  # nn.Linear's default init
        bound = hidden ** -0.5
        return torch.empty(n, hidden).uniform_(-bound, bound, generator=gen)
    return torch.randn(n, hidden, generator=gen) * std


def perturb(w: torch.Tensor, proj: str, noise: float, drop: float, gen_seed: int) -> torch.Tensor:
    """Symmetry breaking for one expert's projection (breaks exactness on purpose).

    noise: add N(0, (noise·std(W))²). drop (Drop-Upcycling): re-draw a ratio `drop` of the expert's
    neurons from N(mean(W), std(W)); the neuron set is drawn from `gen_seed` alone, so gate, up and
    down of one expert drop the same neurons (rows of gate/up, columns of down).
    """
    w = w.float().clone()
    if drop > 0:
        width = w.shape[1] if proj == "down" else w.shape[0]
        picked = torch.randperm(width, generator=torch.Generator().manual_seed(gen_seed))[: int(round(drop * width))]
        gen = torch.Generator().manual_seed(gen_seed * 7 + PROJS.index(proj))
        view = w.T if proj == "down" else w
        view[picked] = torch.randn(len(picked), view.shape[1], generator=gen) * w.std() + w.mean()
    if noise > 0:
        gen = torch.Generator().manual_seed(gen_seed * 13 + PROJS.index(proj))
        w += torch.randn(w.shape, generator=gen) * (noise * w.std())
    return w


class UpcycleShape(NamedTuple):
    """What the checks of an upcycle settle before any tensor is read."""

    target: Target
    shared: int  # shared experts
    moe_layers: list[int]
    d_ff: int  # the dense FFN's width: every expert's
    config: dict  # the output's
    model: ModelShape  # the parent's sizes, as its config and tensors agree on them


def check_upcycle(ckpt: Checkpoint, target_name: str | None, n: int, k: int, *, shared: int | None = None,
                  moe_layers_spec: str = "all", noise: float = 0.0, drop: float = 0.0,
                  expert_sources: list[Checkpoint] = (), routing: str = "renormalised") -> UpcycleShape:
    """Every check of `plan_upcycle` (the same arguments), from config and tensor headers alone: a job
    calls it first when it needs the MoE layers for forward passes (data-driven router rows)."""
    parent = ckpt.config
    if holds_routed_experts(ckpt.tensors):
        raise MoekitError(f"{ckpt.path} is already an MoE model; use split-granularity or add-experts")
    target = choose_target(parent.get("model_type", "unknown"), target_name)
    check_routing(target, routing)
    shape = check_dense(ckpt)  # every tensor the parent's architecture needs, in its config's shapes
    for key, value in target.parent_requires.items():
        if parent.get(key, value) != value:
            raise UsageError(f"{target.model_type} cannot represent {key}={parent[key]} of the parent")
    if parent.get("model_type") == "mistral" and parent.get("sliding_window") and target.model_type != "mixtral":
        raise UsageError(f"{target.model_type} cannot represent the parent's sliding_window={parent['sliding_window']} "
                         "(mixtral can)")
    if not 1 <= k <= n:
        raise UsageError(f"--top-k must be between 1 and --experts ({n}), got {k}")
    lo, hi = target.shared_range
    shared = lo if shared is None else shared
    if not lo <= shared <= hi:
        raise UsageError(f"{target.model_type} holds {lo}–{hi} shared experts, got --shared-experts {shared}")
    if not 0 <= drop < 1 or noise < 0:
        raise UsageError("--drop-upcycling must be in [0, 1) and --noise ≥ 0")
    if expert_sources and len(expert_sources) != n:
        raise UsageError(f"--expert-sources gives {len(expert_sources)} models for {n} experts; give one per expert")

    moe_layers = parse_layers(moe_layers_spec, parent["num_hidden_layers"])
    d_ff = ckpt.meta(DENSE_FFN.format(i=0, proj="up")).shape[0]
    config = build_config(parent, target, n, k, shared, d_ff, moe_layers, routing)
    for src in expert_sources:
        _check_same_ffn(ckpt, src, moe_layers)
    return UpcycleShape(target, shared, moe_layers, d_ff, config, shape)


def plan_upcycle(ckpt: Checkpoint, target_name: str | None, n: int, k: int, *, shared: int | None = None,
                 moe_layers_spec: str = "all", router_init: str = "random", rows: dict[int, torch.Tensor] | None = None,
                 noise: float = 0.0, drop: float = 0.0, expert_sources: list[Checkpoint] = (),
                 dtype: torch.dtype | None = None, seed: int = 0, routing: str = "renormalised") -> UpcyclePlan:
    """The upcycled model's tensors and config; `rows`: data-driven router rows per MoE layer (from
    `moekit.surgery.router_init`), else rows of the data-free `router_init`."""
    target, shared, moe_layers, d_ff, config, shape = check_upcycle(
        ckpt, target_name, n, k, shared=shared, moe_layers_spec=moe_layers_spec, noise=noise, drop=drop,
        expert_sources=expert_sources, routing=routing)
    parent, hidden = ckpt.config, ckpt.config["hidden_size"]
    out_dtype = dtype or next(iter(ckpt.tensors.values())).dtype
    down_scale = softmax_topk_scale(n, k) if routing == "softmax-topk" else 1.0
    exact, notes = not (noise or drop), []
    if routing == "softmax-topk":
        if router_init != "zero":
            exact = False
            notes.append(f"--routing softmax-topk with --router-init {router_init} is not exact at init: only a zero "
                         "router gives every picked expert the weight 1/N that the N/K factor undoes")
        if down_scale != 2 ** round(math.log2(down_scale)) and out_dtype != torch.float32:
            notes.append(f"down_proj × N/K = {down_scale:g} is not a power of two: {str(out_dtype)[6:]} rounds the "
                         "scaled weights, so the output is close to, not bit-exact with, its parent; use float32 to stay exact")
    # One layer's gate/up/down are read once for its N copies.
    load = lru_cache(maxsize=3)(lambda src_idx, name: ([ckpt, *expert_sources][src_idx]).load(name, out_dtype))

    def src_idx(e: int | None) -> int:
        return e + 1 if expert_sources and e is not None else 0

    def ffn(i: int, proj: str, e: int | None = None) -> torch.Tensor:
        w = load(src_idx(e), DENSE_FFN.format(i=i, proj=proj))
        if e is not None and (noise or drop):
            w = perturb(w, proj, noise, drop, gen_seed=(seed * 1_000_003 + i) * 1009 + e).to(out_dtype)
        if e is not None and proj == "down" and down_scale != 1.0:
            w = (w.float() * down_scale).to(out_dtype)
        return w

    def verbatim(i: int, proj: str, e: int) -> tuple[Checkpoint, str] | None:
        """The source tensor expert e's projection is a byte-for-byte copy of, if it is one."""
        src, name = [ckpt, *expert_sources][src_idx(e)], DENSE_FFN.format(i=i, proj=proj)
        scaled = proj == "down" and down_scale != 1.0
        return None if noise or drop or scaled or src.meta(name).dtype != out_dtype else (src, name)

    ffn_names = {DENSE_FFN.format(i=i, proj=p) for i in moe_layers for p in PROJS}
    outputs: list[OutputTensor] = []
    layers: list[dict] = []
    std = parent.get("initializer_range", 0.02)
    untie = target.untie and bool(parent.get("tie_word_embeddings"))
    for meta in ckpt.tensors.values():
        if untie and meta.name == LM_HEAD:
            continue  # a tied parent's stored head (if any) is its embedding: written below from it
        if meta.name not in ffn_names:
            outputs.append(passthrough(ckpt, meta, out_dtype))
            continue
        i = int(re.search(r"layers\.(\d+)\.", meta.name).group(1))
        if meta.name != DENSE_FFN.format(i=i, proj="gate"):  # each layer's block is emitted once, at its gate
            continue
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        layer_rows = rows[i] if rows is not None else router_rows(router_init, n, hidden, gen, std)
        outputs += _moe_block(target, i, n, shared, d_ff, hidden, out_dtype, ffn, verbatim, layer_rows,
                              shared_gate_row=torch.randn(1, hidden, generator=gen) * std)
        layers.append({"layer": i, "experts": n, "top_k": k, "shared_experts": shared, "router_init": router_init,
                       "routing": routing, "down_proj_scale": down_scale,
                       "expert_sources": [str(s.path) for s in expert_sources] or None,
                       "noise": noise, "drop_upcycling": drop})
    if target.config.get("qkv_bias"):  # a parent without q/k/v biases (Llama): zero ones add nothing
        outputs += [OutputTensor(TensorMeta(name.format(i=i), (shape.size(size),), out_dtype),
                                 lambda size=size: torch.zeros(shape.size(size), dtype=out_dtype))
                    for i in range(parent["num_hidden_layers"]) for name, size in QKV_BIAS.items() if name.format(i=i) not in ckpt.tensors]
    if untie:  # runtimes that never tie (llama.cpp's qwen2moe, vLLM's GLM/FlexOlmo) get the head written out
        outputs.append(OutputTensor(TensorMeta(LM_HEAD, ckpt.meta(EMBED).shape, out_dtype),
                                    lambda: ckpt.load(EMBED, out_dtype),
                                    copy_of=(ckpt, EMBED) if ckpt.meta(EMBED).dtype == out_dtype else None))
    return UpcyclePlan(outputs, config, layers, target, moe_layers, exact, notes)


def _moe_block(t: Target, i, n, shared, d_ff, hidden, dtype, ffn, verbatim, rows, shared_gate_row) -> list[OutputTensor]:
    def meta(name, *shape, dt=dtype):
        return TensorMeta(name.format(i=i), tuple(shape), dt)

    block = [OutputTensor(meta(t.router, n, hidden), lambda: rows.to(dtype))]
    if t.router_bias:  # selection bias starts at zero; kept in fp32 as DeepSeek-V3 does
        block.append(OutputTensor(meta(t.router_bias, n, dt=torch.float32), lambda: torch.zeros(n)))
    block += t.experts.emit(i, n, d_ff, hidden, dtype, lambda e, p: ffn(i, p, e),
                            copy=lambda e, p: {"copy_of": verbatim(i, p, e)})
    if shared and t.shared:  # shared experts: the dense FFN's gate/up, zero down_proj → zero output
        width = d_ff * shared

        def shared_weight(_, p: str) -> torch.Tensor:
            return torch.zeros((hidden, width), dtype=dtype) if p == "down" else ffn(i, p).repeat(shared, 1)

        block += t.shared.emit(i, 1, width, hidden, dtype, shared_weight)
        if t.shared_gate:  # not zero: llama.cpp computes this sigmoid as silu(x)/x, NaN at x = 0; the zero
            # down projection keeps the shared output at zero whatever the gate says
            block.append(OutputTensor(meta(t.shared_gate, 1, hidden), lambda: shared_gate_row.to(dtype)))
    return block


def _check_same_ffn(base: Checkpoint, other: Checkpoint, layers: list[int]) -> None:
    for i in layers:
        for p in PROJS:
            name = DENSE_FFN.format(i=i, proj=p)
            if name not in other.tensors or other.meta(name).shape != base.meta(name).shape:
                raise MoekitError(f"{other.path}: {name} missing or shaped differently from the base; "
                                  "--expert-sources must be fine-tunes of the same base")
