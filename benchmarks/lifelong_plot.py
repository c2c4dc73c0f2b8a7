"""Plot lifelong_smollm2.py's results: docs/img/lifelong.png.

    python benchmarks/lifelong_plot.py RESULTS.json docs/img/lifelong.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(results_path: str, out: str) -> None:
    r = json.loads(open(results_path).read())
    before, recipes = r["before"], r["recipes"]
    fig, (ax_curve, ax_bar, ax_kl, ax_vio) = plt.subplots(1, 4, figsize=(21, 4.6))
    for name, entry in recipes.items():
        steps = [h["step"] for h in entry["log"] if "lm_loss" in h]
        ax_curve.plot(steps, [h["lm_loss"] for h in entry["log"] if "lm_loss" in h], label=name)
        ax_vio.plot(steps, [h["maxvio_batch"] for h in entry["log"] if "lm_loss" in h], label=name)
    ax_curve.set(title="training LM loss (French rows)", xlabel="step", ylabel="cross-entropy")
    top_k, n = r["setup"].get("top_k", 2), r["setup"].get("experts", 6)
    ax_vio.axhline(n / top_k - 1, color="grey", lw=0.8, ls="--")  # every token on the same top_k experts
    ax_vio.set(title="MaxVio_batch (mean over MoE layers)", xlabel="step", ylim=(0, n / top_k - 0.8))
    names = list(recipes)
    width = 0.38
    for j, (key, label) in enumerate((("A_en", "A: English (old), held out"), ("B_fr", "B: French (new), held out"))):
        change = [100 * (recipes[n]["after"][key] / before[key] - 1) for n in names]
        bars = ax_bar.bar([i + (j - 0.5) * width for i in range(len(names))], change, width, label=label)
        ax_bar.bar_label(bars, fmt="%+.1f%%", fontsize=8)
    ax_bar.axhline(0, color="black", lw=0.8)
    ax_bar.axhline(1, color="grey", lw=0.8, ls="--")
    ax_bar.set_xticks(range(len(names)), names)
    ax_bar.set(title="held-out loss change vs before training", ylabel="%")
    if all("A_en_kl" in recipes[n]["after"] for n in names):
        bars = ax_kl.bar(names, [recipes[n]["after"]["A_en_kl"] for n in names], color="tab:red")
        ax_kl.bar_label(bars, labels=[f"KL {recipes[n]['after']['A_en_kl']:.3f}\ntop-1 {recipes[n]['after']['A_en_top1']:.0%}"
                                      for n in names], fontsize=8)
        ax_kl.set(title="English drift: KL(before ‖ after) per token", ylabel="nats")
        ax_kl.margins(y=0.25)
    for ax in (ax_curve, ax_bar, ax_vio):
        ax.legend(fontsize=8)
    s = r["setup"]
    fig.suptitle(f"SmolLM2-135M → 4x2 → +2 experts: {s['steps']} steps × {s['batch_size']} × {s['seq_len']} tokens, "
                 f"lr {s['lr']}, {s['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:3])
