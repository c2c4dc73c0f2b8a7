"""Run an output plan: produce each tensor in order and stream it into an atomic output folder.

Surgeries describe their output as a list of `OutputTensor`s (`moekit.checkpoint.plan`: a header
and a function that makes the tensor); this module knows nothing of surgery, and surgery knows
nothing of files.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from moekit.checkpoint import Checkpoint, CheckpointWriter
from moekit.checkpoint.dtypes import config_name
from moekit.checkpoint.plan import OutputTensor
from moekit.checkpoint.reader import TOKENIZER_FILES
from moekit.arch.compat import for_both_lines, tokenizer_config_for_both_lines
from moekit.report.card import build_record, model_card, source_record
from moekit.arch.runtimes import Facts, caveats

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor name)


@dataclass
class WriteResult:
    path: Path
    bytes_written: int
    seconds: float
    shards: int
    side_files: list[str]
    warnings: list[str]

    @property
    def mb_per_s(self) -> float:
        return self.bytes_written / 1e6 / max(self.seconds, 1e-9)


def set_dtype(config: dict, dtype: torch.dtype) -> dict:
    """Record the weights' dtype under the names both transformers lines read."""
    config = dict(config)
    config["torch_dtype"] = config_name(dtype)
    if "dtype" in config:
        config["dtype"] = config_name(dtype)
    return config


def write_model(target: Path, source: Checkpoint, outputs: list[OutputTensor], *, config: dict,
                operation: str, options: dict, layers: list[dict], summary: dict, title: str, what: str,
                extra_sources: list[Checkpoint] = (), extra: dict | None = None, max_shard_size: int, overwrite: bool,
                progress: Progress | None = None, notes: list[str] = (),
                files: dict[str, bytes] | None = None) -> WriteResult:
    """Write `outputs` plus config, side files, moekit.json (with `extra` keys), README.md and any
    further `files` (name -> content); atomic as a whole. `notes` (caveats, one line each) go into
    moekit.json, the model card and the returned warnings."""
    start = time.perf_counter()
    all_sources = [source, *extra_sources]
    # Hash the sources for provenance while the output is written (hashlib releases the GIL).
    records = in_background(lambda: [source_record(s.path, _hashed_files(s)) for s in all_sources])
    plan = [o.meta for o in outputs]
    with CheckpointWriter(target, plan, sources=[s.path for s in all_sources],
                          max_shard_size=max_shard_size, overwrite=overwrite) as out:
        for o in outputs:
            where = o.source_ranges()
            if where:
                out.copy_ranges(o.meta.name, *where)
            else:
                out.write(o.meta.name, o.produce())
            if progress:
                progress(out.bytes_written, out.total_bytes, o.meta.name)
        side_files = source.write_side_files(out.files_dir)
        tokenizer_config_for_both_lines(out.files_dir)
        # RoPE and renamed fields in the forms both transformers lines read, as 5.x reads them now
        config = for_both_lines(config, defaults_of=source.config.get("model_type"))
        notes = [*notes, *caveats(Facts.of_folder(out.files_dir, config, (o.meta.name for o in outputs)))]
        warnings = list(notes)
        if out.swept:
            warnings.append(f"cleaned up after killed runs in {out.target.parent}: {'; '.join(out.swept)}")
        if not any(f in side_files for f in TOKENIZER_FILES):
            warnings.append(f"{source.path}: no tokenizer files; the output has none either (copy them in by hand)")
        # auto_map names the source's own Python files, which an output never carries (nor runs)
        out.write_json("config.json", {k: v for k, v in config.items() if k != "auto_map"})
        seconds = time.perf_counter() - start
        summary = {**summary, "bytes": out.total_bytes, "seconds": round(seconds, 2),
                   "shards": len(out.shards)}
        record = {**build_record(operation, options, records(), layers, summary), **(extra or {})}
        if notes:
            record["notes"] = list(notes)
        out.write_json("moekit.json", record)
        out.write_text("README.md", model_card(title, what, record))
        for name, data in (files or {}).items():
            (out.files_dir / name).write_bytes(data)
        path = out.commit()
    return WriteResult(path, out.total_bytes, time.perf_counter() - start, len(out.shards), side_files, warnings)


def in_background(fn: Callable[[], object]) -> Callable[[], object]:
    """Start `fn` in a daemon thread (one that never holds up an interrupted exit); the returned
    function waits for its result, or raises what it raised."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller, in the main thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result():
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return result


def _hashed_files(ckpt: Checkpoint) -> list[Path]:
    files = list(ckpt.weight_files())
    if ckpt.path.is_dir():
        files.append(ckpt.path / "config.json")
    return files
