"""Does upcycling pay? SmolLM2-135M continued on real code, dense against its MoE upcycles, for the
same tokens, the same data order and the same schedule (docs/upcycling.md).

Arms (models made by moekit's own commands from the real SmolLM2 weights):

- dense: SmolLM2-135M itself, continued (`moekit train --freeze none`);
- 8x2: `moekit upcycle -n 8 -k 2` (renormalised top-2, random router);
- 8x2-drop: the same with `--drop-upcycling 0.5`;
- 32x8: `moekit split-granularity -g 4` of the 8x2 (fine-grained, 32 experts top-8);
- softmax: `moekit upcycle --target qwen2_moe --routing softmax-topk -n 8 -k 2` (softmax over all
  experts, top-2, no renormalisation; zero router, down_proj × N/K). Qwen2-MoE also has a shared
  expert (moekit starts it as the dense FFN with a zero down_proj, so at zero output), which the
  Mixtral arms lack: this arm differs from 8x2 by the routing *and* by that shared expert;
- a second seed (router init and data order) of dense and 8x2.

Every arm trains through `moekit.training.train_model` (what `moekit train` runs after reading
its text files; the rows come pre-tokenised from code_corpus.py, so no `datasets` is needed on
the GPU machine), each in its own process, `--parallel` at a time. With `--steps auto` the step
count is what fits `--budget-s` at the speeds train_speed.py measured. Writes OUT/upcycle_pays.json
and OUT/upcycle_pays.png (held-out loss against tokens and against training FLOPs).

    python benchmarks/upcycle_pays.py SMOLLM2.gguf DATA_DIR OUT --steps auto --speed speed.json --budget-s 420
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ARMS = {  # name -> (model folder key, seed), in the order they run: a deadline cuts the tail
    "dense": ("dense", 0), "8x2": ("8x2", 0), "dense-seed1": ("dense", 1), "8x2-seed1": ("8x2-seed1", 1),
    "softmax": ("8x2-softmax", 0), "8x2-drop": ("8x2-drop", 0), "32x8": ("32x8", 0),
}
SPEED_OF = {"dense": "moekit_dense", "8x2": "moekit_8x2", "8x2-drop": "moekit_8x2", "32x8": "moekit_8x2",
            "dense-seed1": "moekit_dense", "8x2-seed1": "moekit_8x2", "softmax": "moekit_8x2"}
FINE_SLOWDOWN = 1.3  # 32 x top-8 against 8 x top-2 (more, smaller groups): a guess until measured


def moekit(*args: str) -> list[str]:
    return [sys.executable, "-m", "moekit", *args]


def build_models(gguf: str, work: Path) -> tuple[dict[str, Path], dict[str, str]]:
    """The arms' starting points, by moekit's commands (independent ones run side by side)."""
    m = {k: work / k for k in ("dense", "8x2", "8x2-seed1", "8x2-drop", "8x2-softmax", "32x8")}
    commands = {
        "dense": moekit("convert", gguf, str(m["dense"]), "--dtype", "bfloat16"),
        "8x2": moekit("upcycle", str(m["dense"]), str(m["8x2"]), "-n", "8", "-k", "2", "--seed", "0"),
        "8x2-seed1": moekit("upcycle", str(m["dense"]), str(m["8x2-seed1"]), "-n", "8", "-k", "2", "--seed", "1"),
        "8x2-drop": moekit("upcycle", str(m["dense"]), str(m["8x2-drop"]), "-n", "8", "-k", "2",
                           "--drop-upcycling", "0.5", "--seed", "0"),
        "8x2-softmax": moekit("upcycle", str(m["dense"]), str(m["8x2-softmax"]), "-n", "8", "-k", "2", "--target",
                              "qwen2_moe", "--routing", "softmax-topk", "--seed", "0"),
        "32x8": moekit("split-granularity", str(m["8x2"]), str(m["32x8"]), "-g", "4", "--partition", "contiguous"),
    }
    stages = [["dense"], ["8x2", "8x2-seed1", "8x2-drop", "8x2-softmax"], ["32x8"]]
    for stage in stages:
        todo = [k for k in stage if not m[k].exists()]
        procs = {k: subprocess.Popen(commands[k]) for k in todo}
        for k, p in procs.items():
            if p.wait():
                raise SystemExit(f"{' '.join(commands[k])} failed")
    return m, {k: " ".join(c[2:]) for k, c in commands.items()}


def flops_per_token(config: dict, seq_len: int) -> float:
    """Training FLOPs per token: 6 × the matmul weights a token passes through (attention, the
    experts it is routed to or the dense MLP, a shared expert and its gate, the router, the LM
    head) + 6 · L · S · d_attn for the causal attention scores and values."""
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or d // heads
    attn = d * heads * hd * 2 + d * kv * hd * 2
    experts = config.get("num_local_experts") or config.get("num_experts")
    if experts:
        width = config.get("moe_intermediate_size") or config["intermediate_size"]
        mlp = config["num_experts_per_tok"] * 3 * d * width + d * experts + shared_expert(config)
    else:
        mlp = 3 * d * config["intermediate_size"]
    active = layers * (attn + mlp) + d * config["vocab_size"]
    return 6 * active + 6 * layers * seq_len * heads * hd


def shared_expert(config: dict) -> int:
    """Weights of Qwen2-MoE's shared expert and its sigmoid gate, per layer (0 without one)."""
    width = config.get("shared_expert_intermediate_size") or 0
    return 3 * config["hidden_size"] * width + config["hidden_size"] if width else 0


def total_params(config: dict) -> int:
    d, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hd = config.get("head_dim") or d // heads
    experts = config.get("num_local_experts") or config.get("num_experts") or 1
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    per_layer = (d * heads * hd * 2 + d * kv * hd * 2 + experts * 3 * d * width + (d * experts if experts > 1 else 0)
                 + shared_expert(config) + 2 * d)
    return layers * per_layer + d * config["vocab_size"] * (1 if config.get("tie_word_embeddings") else 2) + d


def plan_steps(args, speed: dict, parallel_gain: float, spent: float) -> int:
    ms = sum(speed["runs"][SPEED_OF[a]]["ms_per_step"] * (FINE_SLOWDOWN if a == "32x8" else 1) for a in args.arms)
    seconds = args.budget_s - spent - 15 * len(args.arms) / args.parallel  # start, evals and the write of each arm
    steps = int(seconds * 1000 * parallel_gain / ms)
    return max(args.eval_every, min(args.max_steps, steps) // args.eval_every * args.eval_every)


def arm_options(steps: int, seed: int, moe: bool, args) -> dict:
    return dict(steps=steps, lr=args.lr, lr_schedule="cosine", min_lr_ratio=0.1, warmup_steps=max(1, steps // 20),
                batch_size=16, seq_len=args.seq_len, eval_every=args.eval_every_steps(steps), log_every=10,
                aux_loss_coef=0.01 if moe else 0.0, z_loss_coef=1e-3 if moe else 0.0, seed=seed)


def cli_equivalent(model: str, opts: dict) -> str:
    flags = [f"--{k.replace('_', '-')} {v}" for k, v in opts.items() if v not in (0, 0.0)]
    return f"moekit train {model} OUT --freeze none --data train.txt --eval-data eval.txt " + " ".join(flags)


def run_arm(model: Path, out_json: Path, data: Path, opts: dict) -> None:
    """One arm, in its own process: train, and write its summary, curve and log."""
    import torch

    from moekit.training import TrainOptions, train_model

    rows = torch.load(data / "train.pt")
    need = opts["steps"] * opts["batch_size"]
    train_rows = rows[:need].tolist()  # the same rows for every arm; their order comes from the seed
    eval_rows = torch.load(data / "eval.pt").tolist()
    curve: dict[str, list] = {"train": [], "eval": []}

    def record(logs: dict) -> None:  # written as it comes: an arm stopped at the deadline keeps its curve
        curve["eval" if "eval_loss" in logs else "train"].append(logs)
        if "eval_loss" in logs:
            out_json.write_text(json.dumps({"curve": curve, "partial": True}, default=str))

    output = out_json.with_suffix(".model")
    shutil.rmtree(output, ignore_errors=True)
    summary = train_model(model, output, train_rows, None, None, TrainOptions(**opts), eval_rows=eval_rows,
                          on_log=record)
    curve = json.loads((output / "training_curve.json").read_text())
    shutil.rmtree(output, ignore_errors=True)  # GBs; the numbers are what the evidence needs
    out_json.write_text(json.dumps({"summary": summary, "curve": curve}, default=str))


def at_flops(curve: list[dict], flops_per_tok: float, budget: float) -> float | None:
    """Held-out loss at `budget` training FLOPs, linear between evaluations (None past the end)."""
    pts = [(e["tokens"] * flops_per_tok, e["eval_loss"]) for e in curve]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= budget <= x1:
            return y0 + (y1 - y0) * (budget - x0) / (x1 - x0) if x1 > x0 else y1
    return None


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=110)
    colours = {"dense": "k", "8x2": "tab:blue", "8x2-drop": "tab:orange", "32x8": "tab:green", "softmax": "tab:purple"}
    arms = {n: a for n, a in results["arms"].items() if a.get("curve")}
    start = arms["dense"]["curve"][0]["eval_loss"] if "dense" in arms else None
    lows = [e["eval_loss"] for a in arms.values() for e in a["curve"]]
    top = start * 1.03 if start else max(lows)
    for name, arm in arms.items():
        base = name.replace("-seed1", "")
        style = dict(color=colours.get(base, "tab:red"), ls="--" if name.endswith("seed1") else "-", marker=".")
        tokens = [e["tokens"] / 1e6 for e in arm["curve"]]
        losses = [e["eval_loss"] for e in arm["curve"]]
        label = name if max(losses) <= top else f"{name} ({losses[0]:.1f} → {losses[-1]:.2f}, mostly off scale)"
        axes[0].plot(tokens, losses, label=label, **style)
        axes[1].plot([t * 1e6 * arm["flops_per_token"] / 1e15 for t in tokens], losses, label=label, **style)
    axes[0].set_xlabel("training tokens (M)")
    axes[1].set_xlabel("training FLOPs (PFLOP)")
    for ax in axes:
        ax.set_ylabel("held-out loss (Python code)")
        ax.set_ylim(min(lows) - 0.02, top)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M continued on Python sources: dense vs upcycled ({results['setup']['steps']} steps of 16 x {results['setup']['seq_len']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--replot":  # --replot RESULTS.json PLOT.png
        plot(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_arm":  # a child process: one arm
        _, _, model, out_json, data, opts = sys.argv
        run_arm(Path(model), Path(out_json), Path(data), json.loads(opts))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("data", type=Path, help="folder from code_corpus.py")
    ap.add_argument("out", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/upcycle-pays"))
    ap.add_argument("--steps", default="auto")
    ap.add_argument("--max-steps", type=int, default=620)  # 10.2M tokens of 16 x 1024
    ap.add_argument("--speed", type=Path, help="train_speed.py's JSON (for --steps auto)")
    ap.add_argument("--budget-s", type=float, default=420, help="plan for this; arms still running then are stopped")
    ap.add_argument("--parallel", default="1", help="arms at once; auto: 2 where train_speed.py measured a gain")
    ap.add_argument("--parallel-gain", type=float, default=1.0, help="throughput of --parallel arms over one")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--eval-every", type=int, default=10, help="round the steps to a multiple of this")
    ap.add_argument("--evals", type=int, default=10, help="evaluations over the run")
    args = ap.parse_args()
    args.arms = args.arms.split(",")
    args.eval_every_steps = lambda steps: max(1, steps // args.evals)
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    arms_dir = args.work / "arms"
    arms_dir.mkdir(parents=True, exist_ok=True)
    models, build_commands = build_models(args.gguf, args.work)
    built = time.time() - start
    speed = json.loads(args.speed.read_text()) if args.speed else {}
    if args.parallel == "auto":
        gain = speed.get("runs", {}).get("moekit_8x2_two_at_once", {}).get("throughput_gain") or 1.0
        args.parallel, args.parallel_gain = (2, gain) if gain > 1.15 else (1, 1.0)
    args.parallel = int(args.parallel)
    if args.steps == "auto":
        steps = plan_steps(args, speed, args.parallel_gain, built)
    else:
        steps = int(args.steps)
    corpus = json.loads((args.data / "corpus.json").read_text())
    if steps * 16 > corpus["train_rows"]:
        raise SystemExit(f"{steps} steps need {steps * 16} rows, the corpus has {corpus['train_rows']}")
    print(f"models built in {built:.0f} s; {steps} steps per arm, {args.parallel} at a time", flush=True)
    queue = list(args.arms)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    results = {"setup": {"steps": steps, "seq_len": args.seq_len, "tokens_per_arm": steps * 16 * args.seq_len,
                         "corpus": corpus, "build_commands": build_commands, "build_seconds": round(built, 1),
                         "parallel": args.parallel, "parallel_gain": args.parallel_gain,
                         "softmax": "qwen2_moe with softmax-topk routing: differs from 8x2 by the routing and by "
                         "Qwen2-MoE's shared expert (started at zero output)"}, "arms": {}}
    while queue or running:
        while queue and len(running) < args.parallel:
            name = queue.pop(0)
            key, seed = ARMS[name]
            config = json.loads((models[key] / "config.json").read_text())
            opts = arm_options(steps, seed, "num_local_experts" in config or "num_experts" in config, args)
            results["arms"][name] = {"model": build_commands[key], "train_command": cli_equivalent(key, opts),
                                     "flops_per_token": flops_per_token(config, args.seq_len),
                                     "total_params": total_params(config)}
            running[name] = (subprocess.Popen([sys.executable, __file__, "_arm", str(models[key]),
                                               str(arms_dir / f"{name}.json"), str(args.data), json.dumps(opts)]),
                             time.time())
        time.sleep(1)
        late = time.time() - start > args.budget_s
        if late and queue:
            print(f"deadline: not run: {', '.join(queue)}", flush=True)
            results["setup"]["not_run"] = queue
            queue = []
        for name, (proc, began) in list(running.items()):
            if late and proc.poll() is None:
                proc.terminate()  # its curve so far is on disk
                proc.wait()
                results["arms"][name]["stopped_at_deadline"] = True
            if proc.poll() is not None:
                del running[name]
                arm = results["arms"][name]
                arm["wall_seconds"] = round(time.time() - began, 1)
                path = arms_dir / f"{name}.json"
                done = json.loads(path.read_text()) if path.exists() else {}
                if "curve" in done:
                    arm.update(curve=done["curve"]["eval"], summary=done.get("summary"))
                if proc.returncode:
                    arm["error"] = f"exit {proc.returncode}"
                print(name, {k: v for k, v in arm.items() if k not in ("curve",)}, flush=True)
                (args.out / "upcycle_pays.json").write_text(json.dumps(results, indent=1, default=str))
    # equal tokens: the last evaluation; equal FLOPs: each arm at the dense arm's final FLOPs
    dense = results["arms"].get("dense", {})
    budget = dense["curve"][-1]["tokens"] * dense["flops_per_token"] if "curve" in dense else None
    for arm in results["arms"].values():
        if "curve" in arm:
            arm["final_eval_loss"] = arm["curve"][-1]["eval_loss"]
            arm["eval_loss_at_dense_flops"] = at_flops(arm["curve"], arm["flops_per_token"], budget) if budget else None
    results["setup"]["seconds"] = round(time.time() - start, 1)
    (args.out / "upcycle_pays.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, args.out / "upcycle_pays.png")
    print(json.dumps({n: {k: a.get(k) for k in ("final_eval_loss", "eval_loss_at_dense_flops", "flops_per_token")}
                      for n, a in results["arms"].items()}), flush=True)


if __name__ == "__main__":
    main()
