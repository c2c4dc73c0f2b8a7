"""The upcycle job: open sources, plan the surgery, write the folder. Shared by CLI and recipes."""

from __future__ import annotations

import torch

from moekit.checkpoint import Checkpoint, open_checkpoint
from moekit.checkpoint.dtypes import parse_dtype
from moekit.checkpoint.writer import parse_size
from moekit.errors import UsageError
from moekit.options import UpcycleOptions
from moekit.report.write import Progress, WriteResult, set_dtype, write_model
from moekit.surgery.upcycle import check_upcycle, plan_upcycle


def run_upcycle(opts: UpcycleOptions, progress: Progress | None = None) -> tuple[WriteResult, dict]:
    if opts.experts < 2:  # the planner takes 1 (split-granularity of a dense model starts there)
        raise UsageError(f"--experts must be at least 2, got {opts.experts}")
    dtype = parse_dtype(opts.dtype) if opts.dtype else None
    shard = parse_size(opts.max_shard_size)
    ckpt = open_checkpoint(opts.source, allow_pickle=opts.allow_pickle, dtype=dtype)
    extra = [open_checkpoint(s, allow_pickle=opts.allow_pickle, dtype=dtype) for s in opts.expert_sources]
    checked = dict(shared=opts.shared_experts, moe_layers_spec=opts.moe_layers, noise=opts.noise,
                   drop=opts.drop_upcycling, expert_sources=extra, routing=opts.routing)
    rows = None
    if opts.router_init in ("kmeans", "prompts"):  # forward passes: only once every option is known to be valid
        layers = check_upcycle(ckpt, opts.target, opts.experts, opts.top_k, **checked).moe_layers
        rows = data_router_rows(ckpt, opts, layers)
    plan = plan_upcycle(ckpt, opts.target, opts.experts, opts.top_k, router_init=opts.router_init, rows=rows,
                        dtype=dtype, seed=opts.seed, **checked)
    out_dtype = plan.outputs[0].meta.dtype
    total = sum(o.meta.numel for o in plan.outputs)
    expert_params = sum(o.meta.numel for o in plan.outputs if ".experts." in o.meta.name or "_linear" in o.meta.name
                        and "shared" not in o.meta.name)
    active = total - expert_params + expert_params * opts.top_k // opts.experts
    exact = plan.exact
    summary = {"target": plan.target.model_type, "experts": opts.experts, "top_k": opts.top_k,
               "shared_experts": plan.layers[0]["shared_experts"] if plan.layers else 0,
               "moe_layers": len(plan.moe_layers), "routing": opts.routing, "router_init": opts.router_init, "exact": exact,
               "params_total": total, "params_active": active, "dtype": str(out_dtype).removeprefix("torch.")}
    result = write_model(
        opts.output, ckpt, plan.outputs, config=set_dtype(plan.config, out_dtype), operation="upcycle",
        options=opts.model_dump(mode="json"), layers=plan.layers, summary=summary,
        title=f"{plan.target.architecture} upcycled from {ckpt.path.name}",
        what=(f"A {plan.target.model_type} Mixture-of-Experts model with {opts.experts} experts and top-{opts.top_k} "
              f"routing in {len(plan.moe_layers)} layers, each expert a copy of the dense FFN of `{ckpt.path.name}`. "
              + ("It computes exactly what its parent computes until it is trained." if exact else
                 "Experts were perturbed on purpose (noise / Drop-Upcycling) or the router is not one its routing is "
                 "exact with, so it is close to, not equal to, its parent.")),
        extra_sources=extra, max_shard_size=shard, overwrite=opts.overwrite, progress=progress, notes=plan.notes)
    return result, summary


def data_router_rows(ckpt: Checkpoint, opts: UpcycleOptions, layers: list[int]) -> dict[int, torch.Tensor]:
    """Router rows from forward passes of the dense model: k-means of MLP inputs, or prompts."""
    from moekit.runtime.models import load_dense_model, load_tokenizer, resolve_device
    from moekit.data.text import calibration_texts, read_texts
    from moekit.runtime import capture
    from moekit.surgery.router_init import kmeans_router_rows

    device = resolve_device(opts.device)
    if opts.router_init == "prompts" and len(opts.prompts) != opts.experts:
        raise UsageError(f"--router-init prompts needs one --prompts file per expert: got {len(opts.prompts)} for {opts.experts}")
    model, tokenizer = load_dense_model(ckpt, device), load_tokenizer(ckpt.path)
    if opts.router_init == "prompts":
        negative = read_texts(opts.negative_prompts) if opts.negative_prompts else []
        return capture.prompt_router_rows(model, tokenizer, [read_texts(p) for p in opts.prompts], negative,
                                     layers, device)
    texts = calibration_texts(opts.calibration)
    states = capture.collect_mlp_inputs(model, texts, tokenizer, layers, opts.calibration_tokens, seq_len=512, device=device)
    return kmeans_router_rows(states, opts.experts, seed=opts.seed)
