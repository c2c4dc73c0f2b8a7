"""Training rows from text files, replay mixing and the held-out share."""

from __future__ import annotations

import random
from pathlib import Path

from moekit.errors import MoekitError


def load_text_rows(path: str | Path, tokenizer, seq_len: int) -> list[list[int]]:
    """Token rows of exactly `seq_len` ids from a .txt (paragraphs), .jsonl/.json or .parquet file
    (its "text" column), read with `datasets`; documents are joined with the EOS token between them
    and cut into rows, so no padding is needed and no token is wasted but the last partial row."""
    import datasets

    path = Path(path).expanduser()
    if not path.is_file():
        raise MoekitError(f"{path}: no such data file")
    builder, kw = {".jsonl": ("json", {}), ".json": ("json", {}), ".parquet": ("parquet", {})}.get(
        path.suffix, ("text", {"sample_by": "paragraph"}))
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kw)
    except Exception as e:  # datasets raises many types for unreadable files
        raise MoekitError(f"{path}: cannot read it as {builder} data: {' '.join(str(e).split())[:300]}") from None
    if "text" not in ds.column_names:
        raise MoekitError(f"{path}: no \"text\" column (it has {', '.join(ds.column_names) or 'none'})")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id

    def pack(batch):
        stream = [t for text in batch["text"] if text and text.strip()
                  for t in [*tokenizer(text, add_special_tokens=False)["input_ids"], *([sep] if sep is not None else [])]]
        return {"input_ids": [stream[s : s + seq_len] for s in range(0, len(stream) - seq_len + 1, seq_len)]}

    packed = ds.map(pack, batched=True, batch_size=10_000, remove_columns=ds.column_names, keep_in_memory=True)
    rows = packed["input_ids"] if len(packed) else []  # an empty result has no columns at all
    if not rows:
        raise MoekitError(f"{path}: fewer than --seq-len {seq_len} tokens of text in it")
    return rows


def mix_rows(new: list[list[int]], replay: list[list[int]] | None, replay_ratio: float, seed: int = 0) -> list[dict]:
    """Training examples: every new row, plus replay rows (cycled if too few) making up
    `replay_ratio` of the whole; Trainer's sampler shuffles them."""
    examples = [{"input_ids": r, "replay": 0} for r in new]
    if replay and replay_ratio > 0:
        want = round(len(new) * replay_ratio / (1 - replay_ratio))
        order = list(range(len(replay)))
        random.Random(seed).shuffle(order)
        examples += [{"input_ids": replay[order[i % len(order)]], "replay": 1} for i in range(max(want, 1))]
    return examples


def hold_out(rows: list[list[int]], share: float, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """(training rows, held-out rows): `share` of the rows, at least one, drawn by `seed`."""
    k = max(1, round(len(rows) * share))
    if k >= len(rows):
        raise MoekitError(f"--eval-share {share} of {len(rows)} row(s) leaves nothing to train on")
    held = set(random.Random(seed).sample(range(len(rows)), k))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
