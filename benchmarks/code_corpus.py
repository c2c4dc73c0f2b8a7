"""Training text for the upcycling evidence (docs/upcycling.md): the Python sources of installed
libraries, tokenised and packed into rows.

Real text that no model's test set holds: every `.py` file under ROOT (the GPU machine's
site-packages), in a fixed order, documents joined with EOS and cut into rows of `--seq-len`
tokens (as `moekit train` packs text). Whole files are held out by a hash of their path (1 in
50), so no held-out row shares a file with a training row. Writes `train.pt` / `eval.pt` (int32
[rows, seq_len]) and `corpus.json` (files, characters, tokens, which libraries).

    python benchmarks/code_corpus.py /opt/torch/.venv/lib/python3.12/site-packages TOKENIZER_DIR OUT \
        --max-tokens 60000000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch


def python_files(root: Path) -> list[Path]:
    """Every .py file under root, in the order of a hash of its path: a budget that stops early
    still gets every library's share, not the alphabet's first. Tests and vendored copies are as
    real as the rest."""
    return sorted((p for p in root.rglob("*.py") if p.is_file()),
                  key=lambda p: hashlib.sha256(f"order:{p.relative_to(root)}".encode()).hexdigest())


def held_out(path: Path, root: Path, every: int) -> bool:
    return int(hashlib.sha256(str(path.relative_to(root)).encode()).hexdigest(), 16) % every == 0


def pack(docs: list[list[int]], eos: int, seq_len: int) -> torch.Tensor:
    stream = np.concatenate([np.asarray([*d, eos], dtype=np.int32) for d in docs]) if docs else np.zeros(0, np.int32)
    n = len(stream) // seq_len
    return torch.from_numpy(stream[: n * seq_len].copy()).view(n, seq_len)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("tokenizer", help="a folder with tokenizer.json (SmolLM2's)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=60_000_000, help="stop reading once the training side has this many")
    ap.add_argument("--eval-rows", type=int, default=128)
    ap.add_argument("--hold-out-every", type=int, default=50)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    start = time.time()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    files = python_files(args.root)
    sides = {"train": [], "eval": []}
    counts = {"train": 0, "eval": 0}
    chars = Counter()
    libraries = Counter()
    batch: list[tuple[str, str, str]] = []

    def flush():
        if not batch:
            return
        ids = tok([text for _, text, _ in batch], add_special_tokens=False)["input_ids"]
        for (side, text, lib), doc in zip(batch, ids):
            sides[side].append(doc)
            counts[side] += len(doc) + 1
            chars[side] += len(text)
            if side == "train":
                libraries[lib] += len(doc) + 1
        batch.clear()

    eval_tokens = args.eval_rows * args.seq_len
    for path in files:
        if counts["train"] >= args.max_tokens and counts["eval"] >= eval_tokens:
            break
        side = "eval" if held_out(path, args.root, args.hold_out_every) else "train"
        if counts[side] >= (eval_tokens if side == "eval" else args.max_tokens):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            batch.append((side, text, path.relative_to(args.root).parts[0]))
        if len(batch) >= 256:
            flush()
    flush()
    args.out.mkdir(parents=True, exist_ok=True)
    train = pack(sides["train"], tok.eos_token_id, args.seq_len)[: args.max_tokens // args.seq_len]
    evals = pack(sides["eval"], tok.eos_token_id, args.seq_len)[: args.eval_rows]
    torch.save(train, args.out / "train.pt")
    torch.save(evals, args.out / "eval.pt")
    info = {"root": str(args.root), "files_seen": len(files), "seq_len": args.seq_len,
            "train_rows": train.shape[0], "train_tokens": train.numel(), "eval_rows": evals.shape[0],
            "eval_tokens": evals.numel(), "characters": dict(chars),
            "top_libraries_by_train_tokens": dict(libraries.most_common(15)), "seconds": round(time.time() - start, 1)}
    (args.out / "corpus.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
