from __future__ import annotations

from moekit.commands.common import command, run_surgery
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
    from moekit.jobs.convert import run_convert

    run_surgery("converting", run_convert, opts, lambda result, summary: [
        f"[green]wrote[/] {result.path}: {summary['tensors']} tensors, {result.bytes_written / 1e6:,.1f} MB "
        f"in {result.shards} shard(s), {result.seconds:.1f} s ({result.mb_per_s:,.0f} MB/s)"])
