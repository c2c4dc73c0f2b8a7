"""Lifelong learning on real weights (docs/lifelong.md): does training only new experts learn a new
language while the old one stays put, and how much does full fine-tuning forget instead?

SmolLM2-135M → upcycle (4 experts, top-2) → add-experts (+2, router rows k-means on French) →
train on French man pages (domain B) with each recipe below, for the same steps and data order;
then the loss on held-out English (domain A, the built-in sample) and French, against the grown
model before training. Training goes through `moekit.training.train_model`, the function
`moekit train` runs after reading its text files (so this script needs no `datasets`).

    python benchmarks/lifelong_data.py .bench/lifelong-data
    python benchmarks/lifelong_smollm2.py SMOLLM2.gguf .bench/lifelong-data OUT_DIR --steps 300
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from moekit.data.text import encode, read_texts
from moekit.runtime.models import load_model, load_tokenizer
from moekit.jobs.profile import Domain, profile
from moekit.training import TrainOptions, kd_loss, mean_token_loss, read_manifest, train_model

OLD_EXPERTS = 4  # upcycled to 4 experts, then 2 added
# name -> (freeze manifest?, replay English?, KD weight); in order of importance (a deadline may cut the tail)
RECIPES = {
    "lifelong": (True, True, 1.0),  # frozen base, new experts learn; KD from the old model on English replay rows
    "full": (False, False, 0.0),  # naive full fine-tuning on French
    "frozen-only": (True, False, 0.0),  # the manifest alone: no replay, no KD
    "full+KD": (False, True, 1.0),  # full fine-tuning with the same KD on replay: what freezing adds
}


def rows(path: Path, tokenizer, seq_len: int, limit: int | None = None) -> list[list[int]]:
    """Paragraphs joined by EOS and cut into full rows of seq_len tokens (as `moekit train` does)."""
    stream = [t for p in read_texts(path) for t in [*encode(tokenizer, p), tokenizer.eos_token_id]]
    out = [stream[s : s + seq_len] for s in range(0, len(stream) - seq_len + 1, seq_len)]
    return out[:limit]


def moekit(*args: str) -> None:
    print("$ moekit", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "moekit", *args], check=True)


def evaluate(folder: Path, evals: dict[str, list[list[int]]], reference=None) -> dict[str, float]:
    """Held-out loss per domain, and the share of routed slots the added experts take in each;
    with the model before training as `reference`, also how far the old domain's predictions
    moved: KL(before ‖ after) per token and top-1 agreement on A."""
    model, _ = load_model(folder, torch.float32, "auto")
    out = {k: mean_token_loss(model, v, batch_size=16) for k, v in evals.items()}
    out.update(new_expert_share(model, evals))
    if reference is not None:
        kl = agree = 0.0
        with torch.no_grad():
            for s in range(0, len(evals["A_en"]), 16):
                ids = torch.tensor(evals["A_en"][s : s + 16], device=model.device)
                p, q = reference(input_ids=ids).logits, model(input_ids=ids).logits
                kl += float(kd_loss(q, p)) * ids.numel()
                agree += float((p.argmax(-1) == q.argmax(-1)).float().sum())
        n = len(evals["A_en"]) * len(evals["A_en"][0])
        out.update(A_en_kl=kl / n, A_en_top1=agree / n)
    del model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return out


def new_expert_share(model, evals: dict[str, list[list[int]]]) -> dict[str, float]:
    """Per domain, the share of routed slots (all MoE layers) that go to experts ≥ OLD_EXPERTS."""
    report = profile(model, [Domain(name, list(torch.tensor(v).split(16))) for name, v in evals.items()])
    shares = {}
    for name in evals:
        counts = [layer["domains"][name]["tokens_per_expert"] for layer in report["layers"]]
        shares[f"{name}_new_share"] = sum(sum(c[OLD_EXPERTS:]) for c in counts) / sum(sum(c) for c in counts)
    return shares


def frozen_check(before: Path, after: Path, manifest: dict) -> dict:
    """Frozen tensors and frozen router rows equal bit for bit; trainable ones moved."""
    a, b = safe_open(before / "model.safetensors", "pt"), safe_open(after / "model.safetensors", "pt")
    same = moved = total_frozen = total_trainable = 0
    for name, rule in manifest["tensors"].items():
        x, y = a.get_tensor(name), b.get_tensor(name)
        if isinstance(rule, dict):
            lo, hi = rule["frozen_rows"]
            x_f, y_f, x_t, y_t = x[lo:hi], y[lo:hi], torch.cat([x[:lo], x[hi:]]), torch.cat([y[:lo], y[hi:]])
        else:
            x_f, y_f, x_t, y_t = (x, y, x[:0], y[:0]) if rule == "frozen" else (x[:0], y[:0], x, y)
        if x_f.numel():
            total_frozen += 1
            same += torch.equal(x_f, y_f)
        if x_t.numel():
            total_trainable += 1
            moved += not torch.equal(x_t, y_t)
    return {"frozen_identical": f"{same}/{total_frozen}", "trainable_moved": f"{moved}/{total_trainable}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("source", help="SmolLM2 .gguf (or a dense HF folder)")
    ap.add_argument("data", type=Path, help="folder from lifelong_data.py")
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--router-init", default="kmeans", help="add-experts' new router rows: kmeans (on French), zero, copy")
    ap.add_argument("--deadline", type=float, default=1e9, help="no recipe starts that would end after this (seconds)")
    args = ap.parse_args()
    start = time.time()
    work = args.out / "models"
    work.mkdir(parents=True, exist_ok=True)
    dense, moe, grown = work / "smollm2", work / "smollm2-4x2", work / "smollm2-6x2"
    if not grown.exists():
        moekit("convert", args.source, str(dense), "--dtype", "bfloat16")
        moekit("upcycle", str(dense), str(moe), "-n", str(OLD_EXPERTS), "-k", "2", "--dtype", "bfloat16")
        moekit("add-experts", str(moe), str(grown), "-m", "2", "--router-init", args.router_init,
               "--calibration", str(args.data / "fr_train.txt"), "--drift-tokens", "4096", "--device", "cpu")
    tok = load_tokenizer(grown)
    fr = rows(args.data / "fr_train.txt", tok, args.seq_len)
    en_replay = rows(args.data / "en_replay.txt", tok, args.seq_len)
    evals = {"A_en": rows(args.data / "en_eval.txt", tok, args.seq_len, args.eval_rows),
             "B_fr": rows(args.data / "fr_eval.txt", tok, args.seq_len, args.eval_rows)}
    manifest = read_manifest(grown)
    results = {"setup": {**vars(args), "source": args.source, "data": str(args.data), "out": str(args.out),
                         "fr_train_rows": len(fr), "en_replay_rows": len(en_replay),
                         "eval_tokens": {k: len(v) * args.seq_len for k, v in evals.items()},
                         "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                         "torch": torch.__version__, "transformers": __import__("transformers").__version__},
               "before": evaluate(grown, evals), "recipes": {}}
    print("before:", results["before"], flush=True)
    reference = load_model(grown, torch.float32, "auto")[0]
    last = 0.0  # seconds the previous recipe took: the next one will take about as long
    for name in args.recipes.split(","):
        if time.time() - start + last > args.deadline:
            print(f"deadline: {name} not run", flush=True)
            continue
        began = time.time()
        use_manifest, replay, kd = RECIPES[name]
        logs: list[dict] = []
        opts = TrainOptions(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seq_len=args.seq_len,
                            kd_weight=kd, log_every=10, seed=0)
        try:  # one recipe failing must not cost the others their (GPU) time
            summary = train_model(grown, work / name, fr, en_replay if replay else None,
                                  manifest if use_manifest else None, opts, overwrite=True, on_log=logs.append)
        except Exception as e:
            results["recipes"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(name, "failed:", results["recipes"][name]["error"], flush=True)
            continue
        after = evaluate(work / name, evals, reference)
        entry = {"summary": summary, "after": after, "log": logs}
        if use_manifest:
            entry["check"] = frozen_check(grown, work / name, manifest)
        results["recipes"][name] = entry
        print(name, after, entry.get("check", ""), f"{summary['train_seconds']} s", flush=True)
        (args.out / "lifelong_results.json").write_text(json.dumps(results, indent=1, default=str))
        last = time.time() - began
    (args.out / "lifelong_results.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
