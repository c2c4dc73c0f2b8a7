"""The split-granularity job: open the source (upcycling a dense one on the fly), plan, write."""

from __future__ import annotations

import torch

from moekit.arch.families import holds_routed_experts
from moekit.checkpoint import Checkpoint, open_checkpoint
from moekit.checkpoint.dtypes import parse_dtype
from moekit.checkpoint.planned import PlannedCheckpoint
from moekit.checkpoint.writer import parse_size
from moekit.options import SplitOptions
from moekit.report.write import Progress, WriteResult, set_dtype, write_model
from moekit.runtime.capture import calibration_mlp_inputs
from moekit.surgery.split import plan_split
from moekit.surgery.upcycle import plan_upcycle


def run_split(opts: SplitOptions, progress: Progress | None = None) -> tuple[WriteResult, dict]:
    dtype = parse_dtype(opts.dtype) if opts.dtype else None
    shard = parse_size(opts.max_shard_size)
    ckpt = open_checkpoint(opts.source, allow_pickle=opts.allow_pickle, dtype=dtype)
    dense = not holds_routed_experts(ckpt.tensors)
    source: Checkpoint = ckpt
    if dense:  # MoEfication: one expert (the FFN) per layer, split G ways; the router starts at zero
        up = plan_upcycle(ckpt, opts.target, 1, 1, shared=opts.shared_experts, moe_layers_spec=opts.moe_layers,
                          router_init="zero", dtype=dtype, seed=opts.seed)
        source = PlannedCheckpoint(ckpt, up.outputs, up.config)
    from moekit.runtime.models import resolve_device

    device = resolve_device(opts.device) if opts.partition in ("kmeans", "coactivation") else "cpu"
    plan = plan_split(source, opts.granularity, top_k=opts.top_k, method=opts.partition, seed=opts.seed, dtype=dtype,
                      hidden_states=lambda layers: calibration_mlp_inputs(ckpt.path, layers, opts.calibration,
                                                                          opts.calibration_tokens, device,
                                                                          allow_pickle=opts.allow_pickle),
                      device=device)
    out_dtype = plan.outputs[0].meta.dtype
    summary = {"target": plan.target.model_type, "from": "dense" if dense else f"{plan.experts // opts.granularity} experts",
               "granularity": opts.granularity, "experts": plan.experts, "top_k": plan.top_k,
               "partition": opts.partition, "child_factor": plan.factor, "exact": plan.exact,
               "moe_layers": len(plan.layers), "dtype": str(out_dtype).removeprefix("torch.")}
    if plan.factor not in (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0) and out_dtype != torch.float32:
        summary["note"] = (f"child factor {plan.factor:g} is not a power of two: scaling {summary['dtype']} weights "
                           "rounds them, so the result is close to, not bit-equal to, the source; use float32 to stay exact")
    result = write_model(
        opts.output, ckpt, plan.outputs, config=set_dtype(plan.config, out_dtype), operation="split-granularity",
        options=opts.model_dump(mode="json"), layers=plan.layers, summary=summary,
        title=f"{plan.target.architecture} split into {plan.experts} fine-grained experts",
        what=(f"Each expert of `{ckpt.path.name}` " + ("(a dense model, upcycled on the fly) " if dense else "")
              + f"split into {opts.granularity} experts of width 1/{opts.granularity} ({opts.partition} neuron partition), "
              f"routed top-{plan.top_k} of {plan.experts}. "
              + ("It computes exactly what its source computes." if plan.exact else
                 "Top-k was changed from K·G, so it is close to, not equal to, its source.")),
        max_shard_size=shard, overwrite=opts.overwrite, progress=progress)
    return result, summary

