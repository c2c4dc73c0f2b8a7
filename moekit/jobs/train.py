"""The train job: check everything cheap, read the text, train, write (moekit.training does the work)."""

from __future__ import annotations

from typing import Callable

from moekit.data.text import existing_data_file
from moekit.options import TrainRunOptions
from moekit.runtime.models import load_tokenizer
from moekit.training import (check_run, checkpoint_folder, last_checkpoint, load_text_rows, read_manifest,
                             train_model)


def run_train(opts: TrainRunOptions, on_log: Callable[[dict], None], announce: Callable[[str], None]) -> dict:
    """Train as `opts` say; `announce` hears how many rows were read, `on_log` every log entry.
    Returns the summary (without "output" on a process of a multi-GPU run that writes nothing)."""
    # Everything that can be wrong with the options fails now, before minutes of loading.
    for path in (opts.data, opts.replay, opts.eval_data):
        if path is not None:
            existing_data_file(path)
    manifest = (None if opts.freeze == "none"
                else read_manifest(opts.model if opts.freeze == "manifest" else opts.freeze))
    check_run(opts.model, opts.output, manifest, opts.overwrite)
    if opts.resume:
        last_checkpoint(checkpoint_folder(opts.output, opts.checkpoint_dir))
    tokenizer = load_tokenizer(opts.model)
    new_rows = load_text_rows(opts.data, tokenizer, opts.seq_len)
    replay_rows = load_text_rows(opts.replay, tokenizer, opts.seq_len) if opts.replay else None
    eval_rows = load_text_rows(opts.eval_data, tokenizer, opts.seq_len) if opts.eval_data else None
    announce(f"{len(new_rows):,} rows of {opts.seq_len} tokens from {opts.data}"
             + (f", {len(replay_rows):,} from {opts.replay}" if replay_rows else "")
             + (f", {len(eval_rows):,} held out in {opts.eval_data}" if eval_rows else ""))
    return train_model(opts.model, opts.output, new_rows, replay_rows, manifest, opts.training(), eval_rows=eval_rows,
                       checkpoints=opts.checkpoint_dir, resume=opts.resume, overwrite=opts.overwrite, on_log=on_log,
                       record={"data": str(opts.data), "replay": str(opts.replay) if opts.replay else None,
                               "freeze": opts.freeze, "eval_data": str(opts.eval_data) if opts.eval_data else None})
