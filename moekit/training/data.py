"""Training rows from text files, replay mixing and the held-out share."""

from __future__ import annotations

import random
from pathlib import Path

from moekit.data.text import TRAINING, pack_text, read_texts, separator
from moekit.errors import MoekitError


def load_text_rows(path: str | Path, tokenizer, seq_len: int) -> list[list[int]]:
    """Token rows of exactly `seq_len` ids from a text file (`moekit.data.text`); documents are
    joined with the EOS token between them and cut into rows, so no padding is needed."""
    texts = read_texts(path, TRAINING)
    rows = pack_text(texts, tokenizer, seq_len, separator=separator(tokenizer), min_last=seq_len, docs_per_pack=10_000)
    if not rows:
        raise MoekitError(f"{Path(path).expanduser()}: fewer than --seq-len {seq_len} tokens of text in it")
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
