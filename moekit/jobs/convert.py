"""The convert job: a checkpoint rewritten tensor by tensor as a safetensors folder."""

from __future__ import annotations

from moekit.checkpoint import open_checkpoint
from moekit.checkpoint.dtypes import parse_dtype
from moekit.checkpoint.writer import parse_size
from moekit.options import ConvertOptions
from moekit.report.write import Progress, WriteResult, set_dtype, write_model
from moekit.surgery.convert import plan_convert


def run_convert(opts: ConvertOptions, progress: Progress | None = None) -> tuple[WriteResult, dict]:
    target_dtype = parse_dtype(opts.dtype) if opts.dtype else None
    shard = parse_size(opts.max_shard_size)
    ckpt = open_checkpoint(opts.source, allow_pickle=opts.allow_pickle, dtype=target_dtype)
    outputs = plan_convert(ckpt, target_dtype)
    out_dtype = target_dtype or outputs[0].meta.dtype
    summary = {"tensors": len(outputs), "dtype": str(out_dtype).removeprefix("torch.")}
    result = write_model(
        opts.output, ckpt, outputs, config=set_dtype(ckpt.config, out_dtype), operation="convert",
        options={"dtype": opts.dtype, "max_shard_size": opts.max_shard_size}, layers=[], summary=summary,
        title=f"{ckpt.config.get('model_type', 'model')} converted by moekit",
        what=f"A tensor-by-tensor copy of `{ckpt.path.name}` as safetensors ({out_dtype}).",
        max_shard_size=shard, overwrite=opts.overwrite, progress=progress)
    return result, {"tensors": len(outputs)}
