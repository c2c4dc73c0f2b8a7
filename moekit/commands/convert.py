from __future__ import annotations

from typing import Annotated

import typer

from moekit.commands.common import (JsonOpt, OutputArg, OverwriteOpt, PickleOpt, ShardOpt, SourceArg, byte_progress,
                                    err, handle_errors, print_json, warn)


@handle_errors
def convert_command(
    source: SourceArg,
    output: OutputArg,
    dtype: Annotated[str | None, typer.Option(help="Cast floating-point weights: float32, bfloat16, float16. Default: keep (GGUF: float32).")] = None,
    max_shard_size: ShardOpt = "5GB",
    overwrite: OverwriteOpt = False,
    allow_pickle: PickleOpt = False,
    json_output: JsonOpt = False,
) -> None:
    """Rewrite a checkpoint as a plain safetensors Hugging Face folder, tensor by tensor.

    Takes a GGUF file (dequantised), a pickle checkpoint (with --allow-pickle) or a safetensors
    folder (to change dtype or shard size). Tokenizer files, chat template and generation config
    come along unchanged.

    Examples:

        moekit convert smollm2-135m ./smollm2 --dtype bfloat16
        moekit convert ./old-bin-model ./model --allow-pickle
    """
    from moekit.checkpoint import open_checkpoint
    from moekit.checkpoint.dtypes import parse_dtype
    from moekit.checkpoint.writer import parse_size
    from moekit.surgery.convert import plan_convert

    target_dtype = parse_dtype(dtype) if dtype else None
    shard = parse_size(max_shard_size)
    ckpt = open_checkpoint(source, allow_pickle=allow_pickle, dtype=target_dtype)
    from moekit.pipeline import set_dtype, write_model

    outputs = plan_convert(ckpt, target_dtype)
    out_dtype = target_dtype or outputs[0].meta.dtype
    with byte_progress("converting", not json_output) as progress:
        result = write_model(
            output, ckpt, outputs, config=set_dtype(ckpt.config, out_dtype), operation="convert",
            options={"dtype": dtype, "max_shard_size": max_shard_size}, layers=[],
            summary={"tensors": len(outputs), "dtype": str(out_dtype).removeprefix("torch.")},
            title=f"{ckpt.config.get('model_type', 'model')} converted by moekit",
            what=f"A tensor-by-tensor copy of `{ckpt.path.name}` as safetensors ({out_dtype}).",
            max_shard_size=shard, overwrite=overwrite, progress=progress)
    for w in result.warnings:
        warn(w)
    summary = {"output": str(result.path), "tensors": len(outputs), "bytes": result.bytes_written,
               "shards": result.shards, "seconds": round(result.seconds, 2), "MB/s": round(result.mb_per_s, 1)}
    if json_output:
        print_json(summary)
    else:
        err.print(f"[green]wrote[/] {result.path}: {len(outputs)} tensors, {result.bytes_written / 1e6:,.1f} MB "
                  f"in {result.shards} shard(s), {result.seconds:.1f} s ({result.mb_per_s:,.0f} MB/s)")
