"""What a checkpoint is, from its config and tensor headers alone (no weights are read).

Counts come from the headers, which cannot lie about what is on disk; the config says how the
model is meant to route (top-k, routing family). Where the two disagree or one is silent, the
report says so in `notes` instead of guessing.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from moekit.arch.families import DENSE_FAMILIES, LAYER, MOE_CONFIG, ROUTED, SHARED, read_field
from moekit.checkpoint import Checkpoint, TensorMeta

EXPERT_ID = re.compile(r"\.experts\.(\d+)\.")
ROUTER = re.compile(r"\.(?:mlp|block_sparse_moe|ffn)\.(?:gate|router|router\.layer)\.weight$")
DENSE_FFN_UP = re.compile(r"\.mlp\.(?:up_proj|gate_proj|c_fc|fc1)\.weight$")


def ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    parts, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(parts) or "none"


def _layer_stats(tensors: dict[str, TensorMeta]) -> dict[int, dict]:
    layers: dict[int, dict] = defaultdict(lambda: {"routed": 0, "shared": 0, "router": 0, "experts": set(),
                                                   "fused_experts": None, "dense_ffn_width": None, "router_rows": None})
    for meta in tensors.values():
        m = LAYER.search(meta.name)
        if not m:
            continue
        layer = layers[int(m.group(1))]
        if SHARED.search(meta.name):
            layer["shared"] += meta.numel
        elif ROUTED.search(meta.name):
            layer["routed"] += meta.numel
            eid = EXPERT_ID.search(meta.name)
            if eid:
                layer["experts"].add(int(eid.group(1)))
            elif len(meta.shape) == 3:
                layer["fused_experts"] = meta.shape[0]
        elif ROUTER.search(meta.name):
            layer["router"] += meta.numel
            layer["router_rows"] = meta.shape[0]
        elif DENSE_FFN_UP.search(meta.name):
            layer["dense_ffn_width"] = meta.shape[0]
    return dict(sorted(layers.items()))


def describe(ckpt: Checkpoint) -> dict:
    """A plain-dict report of the checkpoint (the JSON of `moekit inspect --json`)."""
    cfg, tensors = ckpt.config, ckpt.tensors
    model_type = cfg.get("model_type") or "unknown"
    notes: list[str] = []
    layers = _layer_stats(tensors)
    moe_layers = [i for i, s in layers.items() if s["routed"]]
    dense_layers = [i for i in layers if i not in moe_layers]
    total = sum(m.numel for m in tensors.values())
    files = {f.name: f.stat().st_size for f in ckpt.weight_files()}
    report = {
        "source": str(ckpt.path),
        "format": type(ckpt).__name__.removesuffix("Checkpoint").lower(),
        "model_type": model_type,
        "architectures": cfg.get("architectures"),
        "num_layers": read_field(cfg, "num_hidden_layers"),
        "hidden_size": read_field(cfg, "hidden_size"),
        "vocab_size": read_field(cfg, "vocab_size"),
        "intermediate_size": read_field(cfg, "intermediate_size"),
        "kind": "moe" if moe_layers else "dense",
        "params_total": total,
        "params_active_per_token": total,
        "dtypes": dict(Counter(str(m.dtype).removeprefix("torch.") for m in tensors.values())),
        "files": files,
        "bytes_total": sum(files.values()),
        "notes": notes,
    }
    if len(layers) and report["num_layers"] not in (None, len(layers)):
        notes.append(f"config says {report['num_layers']} layers, the weights hold {len(layers)}")
    if not moe_layers:
        widths = {s["dense_ffn_width"] for s in layers.values()} - {None}
        report["dense_ffn_width"] = widths.pop() if len(widths) == 1 else None
        if model_type not in DENSE_FAMILIES:
            notes.append(f"moekit has no surgery for dense model_type {model_type!r} (supported: {', '.join(DENSE_FAMILIES)})")
        return report
    report["moe"] = _describe_moe(cfg, model_type, layers, moe_layers, dense_layers, notes)
    report["params_active_per_token"] = report["moe"].pop("_active_total_delta") + total
    return report


def _count(cfg: dict, field, notes: list[str]) -> int | None:
    """A config count, or None (with a note) where the config gives something that is not one."""
    value = read_field(cfg, field)
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    notes.append(f"config's {field if isinstance(field, str) else field[0]} is {value!r}, not a positive integer")
    return None


def _describe_moe(cfg, model_type, layers, moe_layers, dense_layers, notes) -> dict:
    fields = MOE_CONFIG.get(model_type)
    if fields is None:
        notes.append(f"moekit has no routing table for model_type {model_type!r}: top-k and routing are not known")
    counts = {}
    for i in moe_layers:
        s = layers[i]
        counts[i] = len(s["experts"]) or s["fused_experts"] or s["router_rows"]
    distinct_counts = set(counts.values())
    n_experts = distinct_counts.pop() if len(distinct_counts) == 1 else None
    if n_experts is None:
        notes.append(f"expert counts differ between layers: {counts}")
    top_k = _count(cfg, fields.top_k, notes) if fields else None
    cfg_experts = _count(cfg, fields.experts, notes) if fields else None
    if cfg_experts is not None and n_experts is not None and cfg_experts != n_experts:
        notes.append(f"config says {cfg_experts} experts ({fields.experts}), the weights hold {n_experts}")
    shared = None
    if fields and fields.shared_experts:
        shared = read_field(cfg, fields.shared_experts)
    elif fields and fields.shared_width:
        shared = 1 if (read_field(cfg, fields.shared_width) or 0) > 0 else 0
    elif fields:
        shared = 0
    if shared is None and any(layers[i]["shared"] for i in moe_layers):
        notes.append("the weights hold shared experts but the config does not say how many")

    delta = 0
    router_params = sum(layers[i]["router"] for i in moe_layers)
    active_expert_params = 0
    for i in moe_layers:
        n = counts[i]
        if top_k and n:
            delta -= layers[i]["routed"] - layers[i]["routed"] * top_k // n
            active_expert_params += layers[i]["routed"] * top_k // n + layers[i]["shared"]
    if not top_k:
        notes.append("top-k unknown: active parameters are counted as if every expert ran")
    hidden = read_field(cfg, "hidden_size")
    moe = {
        "routing": fields.routing.formula if fields else "unknown",
        "experts": n_experts,
        "top_k": top_k,
        "shared_experts": shared,
        "expert_width": read_field(cfg, fields.expert_width) if fields else None,
        "norm_topk_prob": cfg.get("norm_topk_prob"),
        "routed_scaling_factor": cfg.get("routed_scaling_factor"),
        "moe_layers": ranges(moe_layers),
        "dense_layers": ranges(dense_layers),
        "num_moe_layers": len(moe_layers),
        "router_params": router_params,
        "_active_total_delta": delta,
    }
    if active_expert_params and hidden:
        # Router: one H×N product per token per layer; experts: 2 FLOPs per active weight.
        router_flops = sum(2 * hidden * counts[i] for i in moe_layers if counts[i])
        moe["router_flops_per_token"] = router_flops
        moe["expert_flops_per_token"] = 2 * active_expert_params
        moe["router_flops_share"] = router_flops / (2 * active_expert_params)
    return moe
