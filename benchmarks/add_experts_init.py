"""How each add-experts init trades function drift on the old domain against traffic to the new
experts on the new domain (docs/add-experts.md).

Base: SmolLM2-135M upcycled to 8 experts top-2 with k-means router rows and 5% relative noise on
the experts (so the old experts differ a little, as after light training, while the model stays a
working LM; a base with Drop-Upcycling 0.5 turned out chaotic: ulp-level changes in routing
weights grew to a different top-1 for a third of the tokens, which measures the base, not the init). Old domain: the built-in English sample. New domain:
Python source code from the standard library. For each (init, router init) it grows 2 experts and
reports verify's numbers on old-domain text and the share of top-k slots the new experts win.

    .venv/bin/python benchmarks/add_experts_init.py [WORKDIR]
"""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

from moekit.checkpoint import open_checkpoint
from moekit.metrics import select_experts
from moekit.runtime.capture import calibration_mlp_inputs
from moekit.arch.targets import TARGETS

CASES = [("copy", "copy"), ("copy", "zero"), ("drop-upcycling", "copy"), ("mean", "copy"), ("mean", "zero"),
         ("random", "zero"), ("copy", "kmeans")]


def moekit(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "moekit", *args, "--json"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def new_expert_share(model: Path, code: Path, old: int) -> float:
    """Share of top-k slots that go to experts ≥ old on the new-domain text, over all MoE layers."""
    ckpt = open_checkpoint(model)
    t = TARGETS[ckpt.config["model_type"]]
    layers = list(range(ckpt.config["num_hidden_layers"]))
    states = calibration_mlp_inputs(model, layers, code, 2048, "cpu")
    won = total = 0
    for i, x in states.items():
        picked = select_experts(t.routing, x @ ckpt.load(t.router.format(i=i), torch.float32).T,
                                ckpt.config["num_experts_per_tok"], None)
        won += (picked >= old).sum().item()
        total += picked.numel()
    return won / total


def main(work: str | None = None) -> None:
    work = Path(work or tempfile.mkdtemp(prefix="moekit-grow-"))
    work.mkdir(parents=True, exist_ok=True)
    code = work / "code.txt"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code.write_text("\n\n".join((stdlib / f).read_text() for f in ("textwrap.py", "heapq.py", "bisect.py", "shlex.py")))
    base = work / "base"
    if not base.exists():
        moekit("upcycle", "smollm2-135m", str(base), "-n", "8", "-k", "2", "--noise", "0.05",
               "--router-init", "kmeans", "--calibration-tokens", "4096")
    print("| init | router rows | max rel. logit error (old) | top-1 agreement (old) | KL/token (old) | new-expert share of top-k slots (new domain) |")
    print("|---|---|---|---|---|---|")
    for init, router in CASES:
        out = work / f"{init}-{router}"
        args = ["add-experts", str(base), str(out), "-m", "2", "--init", init, "--router-init", router,
                "--calibration", str(code), "--calibration-tokens", "2048", "--drift-tokens", "2048", "--overwrite"]
        d = moekit(*args)["drift"]
        share = new_expert_share(out, code, 8)
        print(f"| {init} | {router} | {d['max_rel_error']:.3g} | {d['top1_agreement']:.2%} | {d['kl_per_token']:.3g} | {share:.1%} |",
              flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
