from __future__ import annotations

from moekit.commands.common import byte_progress, command, err, print_json, warn, written
from moekit.options import ConvertOptions


@command(ConvertOptions)
def convert_command(opts: ConvertOptions) -> None:
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

    target_dtype = parse_dtype(opts.dtype) if opts.dtype else None
    shard = parse_size(opts.max_shard_size)
    ckpt = open_checkpoint(opts.source, allow_pickle=opts.allow_pickle, dtype=target_dtype)
    from moekit.report.write import set_dtype, write_model

    outputs = plan_convert(ckpt, target_dtype)
    out_dtype = target_dtype or outputs[0].meta.dtype
    with byte_progress("converting", not opts.json_output) as progress:
        result = write_model(
            opts.output, ckpt, outputs, config=set_dtype(ckpt.config, out_dtype), operation="convert",
            options={"dtype": opts.dtype, "max_shard_size": opts.max_shard_size}, layers=[],
            summary={"tensors": len(outputs), "dtype": str(out_dtype).removeprefix("torch.")},
            title=f"{ckpt.config.get('model_type', 'model')} converted by moekit",
            what=f"A tensor-by-tensor copy of `{ckpt.path.name}` as safetensors ({out_dtype}).",
            max_shard_size=shard, overwrite=opts.overwrite, progress=progress)
    for w in result.warnings:
        warn(w)
    if opts.json_output:
        print_json({"tensors": len(outputs), **written(result)})
    else:
        err.print(f"[green]wrote[/] {result.path}: {len(outputs)} tensors, {result.bytes_written / 1e6:,.1f} MB "
                  f"in {result.shards} shard(s), {result.seconds:.1f} s ({result.mb_per_s:,.0f} MB/s)")
