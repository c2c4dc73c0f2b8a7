"""Expert pruning on a trained MoE: REAP vs frequency vs EAN vs random, held-out loss per domain.

SmolLM2-135M is upcycled to 8 experts top-2 (k-means router, Drop-Upcycling 0.5 so that experts
start apart), trained briefly on real code and prose with `moekit.training.train_model` (what
`moekit train --freeze none` runs), then pruned with `moekit prune` by each method at 25% and
50%, calibrated on code. Every model's held-out next-token loss is measured on code and on
prose that neither training nor calibration saw (other packages' files).

Text comes from a Python installation's site-packages: `.py` files are code; licence files,
READMEs and package descriptions (METADATA) are prose. Packages are split by a hash of their
name into train / calibration / held-out, so the held-out text is from other packages.

    python benchmarks/prune_smollm2.py --source SmolLM2-135M-Instruct.Q4_1.gguf --work /tmp/prune \\
        --site-packages /opt/torch/.venv/lib/python3.12/site-packages --json results.json

A CPU dry run of the whole script on a tiny model: see --help (--steps 2 --eval-rows 2 ...).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

PROSE_NAMES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS", "README", "METADATA", "DESCRIPTION")


def split_of(package: str) -> str:
    h = int(hashlib.sha256(package.encode()).hexdigest(), 16) % 10
    return "eval" if h == 0 else "calib" if h == 1 else "train"


def is_prose(path: Path) -> bool:
    return path.suffix in (".md", ".rst") or any(path.name.upper().startswith(n) for n in PROSE_NAMES)


def gather_text(site: Path, work: Path, budget: dict[str, int]) -> dict[str, Path]:
    """Files code-{train,calib,eval}.txt and prose-{train,eval}.txt, paragraphs separated by blank
    lines, at most `budget[name]` characters each, in a fixed (sorted) file order."""
    chunks: dict[str, list[str]] = {k: [] for k in budget}
    have = dict.fromkeys(budget, 0)
    for path in sorted(site.rglob("*")):
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        domain = "code" if path.suffix == ".py" else "prose" if is_prose(path) else None
        if domain is None:
            continue
        name = f"{domain}-{split_of(path.relative_to(site).parts[0].split('-')[0].split('.')[0].lower())}"
        if name not in budget or have[name] >= budget[name]:
            continue
        try:
            text = path.read_text(encoding="utf-8").strip()
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 200:
            continue
        chunks[name].append(text)
        have[name] += len(text)
    empty = [name for name, texts in chunks.items() if not texts]
    if empty:
        sys.exit(f"{site}: no text for {', '.join(empty)}")
    files = {}
    for name, texts in chunks.items():
        files[name] = work / f"{name}.txt"
        files[name].write_text("\n\n".join(texts)[: budget[name]])
    return files


def token_rows(path: Path, tokenizer, seq_len: int, max_rows: int | None = None) -> list[list[int]]:
    """The file's paragraphs tokenised, joined with EOS, cut into full rows of seq_len."""
    from moekit.data.text import encode, read_texts

    stream: list[int] = []
    for text in read_texts(path):
        stream += encode(tokenizer, text) + [tokenizer.eos_token_id]
        if max_rows and len(stream) >= max_rows * seq_len:
            break
    rows = [stream[s:s + seq_len] for s in range(0, len(stream) - seq_len + 1, seq_len)]
    return rows[:max_rows] if max_rows else rows


def moekit(*args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moekit", *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"moekit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  moekit {args[0]} {Path(str(args[2])).name if len(args) > 2 else ''}: "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return time.perf_counter() - start


def held_out_loss(model_dir: Path, rows: dict[str, list[list[int]]], device: str) -> dict[str, float]:
    from moekit.runtime.models import load_model
    from moekit.training import mean_token_loss

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = load_model(model_dir, dtype, device)[0]
    out = {domain: round(mean_token_loss(model, r, batch_size=16), 4) for domain, r in rows.items()}
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="dense model: the SmolLM2 GGUF, or a folder (a tiny model for a dry run)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--site-packages", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--train-chars", type=int, default=4_000_000, help="per domain")
    ap.add_argument("--calibration-tokens", type=int, default=65536)
    ap.add_argument("--eval-rows", type=int, default=64, help="held-out rows of --seq-len per domain")
    ap.add_argument("--ratios", default="0.25,0.5")
    ap.add_argument("--methods", default="reap,frequency,ean,random")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    from moekit.runtime.models import load_tokenizer
    from moekit.training import TrainOptions, train_model

    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    eval_chars = args.eval_rows * args.seq_len * 6
    files = gather_text(args.site_packages, w, {"code-train": args.train_chars, "prose-train": args.train_chars,
                                                "code-calib": args.calibration_tokens * 6,
                                                "code-eval": eval_chars, "prose-eval": eval_chars})
    print(f"text: {', '.join(f'{k} {p.stat().st_size / 1e6:.2f} MB' for k, p in files.items())} "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)
    timing = {}
    dense = w / "dense"
    if str(args.source).endswith(".gguf"):
        timing["convert"] = moekit("convert", args.source, dense, "--dtype", "bfloat16")
    else:
        dense = Path(args.source)
    moe = w / f"moe-{args.experts}x{args.top_k}"
    timing["upcycle"] = moekit("upcycle", dense, moe, "-n", args.experts, "-k", args.top_k, "--router-init", "kmeans",
                               "--drop-upcycling", "0.5", "--device", args.device)
    tokenizer = load_tokenizer(dense)
    code, prose = (token_rows(files[f], tokenizer, args.seq_len) for f in ("code-train", "prose-train"))
    trained = w / "trained"
    start = time.perf_counter()
    train = train_model(moe, trained, code, prose, None,
                        TrainOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                                     warmup_steps=min(20, args.steps // 10), aux_loss_coef=0.01, replay_ratio=0.5,
                                     log_every=max(1, args.steps // 6)),
                        on_log=lambda logs: "loss" in logs and print(f"  step {logs['step']} loss {logs['loss']:.3f}", flush=True))
    timing["train"] = time.perf_counter() - start
    print(f"trained: {train.get('tokens', '?')} tokens, {len(code)} code + {len(prose)} prose rows", flush=True)

    pruned = {}
    for ratio in map(float, args.ratios.split(",")):
        for method in args.methods.split(","):
            out = w / f"pruned-{method}-{ratio:g}"
            timing[out.name] = moekit("prune", trained, out, "--ratio", ratio, "--method", method,
                                      "--calibration", files["code-calib"], "--calibration-tokens",
                                      args.calibration_tokens, "--device", args.device)
            pruned[out.name] = (method, ratio, out)

    rows = {d: token_rows(files[f"{d}-eval"], tokenizer, args.seq_len, args.eval_rows) for d in ("code", "prose")}
    losses = {"dense": held_out_loss(dense, rows, args.device), "moe (not trained)": held_out_loss(moe, rows, args.device),
              "trained": held_out_loss(trained, rows, args.device)}
    kept = {}
    for name, (method, ratio, out) in pruned.items():
        losses[name] = held_out_loss(out, rows, args.device)
        kept[name] = [r["kept"] for r in json.loads((out / "moekit.json").read_text())["layers"]]
        print(f"  {name}: {losses[name]}", flush=True)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "eval_tokens": {d: len(r) * args.seq_len for d, r in rows.items()},
              "train": {k: train.get(k) for k in ("steps", "tokens", "train_seconds", "final_loss")},
              "losses": losses, "kept": kept, "seconds": {k: round(v, 1) for k, v in timing.items()},
              "total_seconds": round(time.perf_counter() - t0, 1)}
    args.json.write_text(json.dumps(result, indent=1))
    print(f"{'model':28} {'code':>8} {'prose':>8}")
    for name, loss in losses.items():
        print(f"{name:28} {loss['code']:8.4f} {loss['prose']:8.4f}")
    print(f"total {result['total_seconds']} s")


if __name__ == "__main__":
    main()
