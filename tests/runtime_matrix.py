"""The runtime matrix: every moekit output loaded in transformers 5.x, transformers 4.57 and
llama.cpp, each compared with its parent's logits as transformers 5.x computes them.

Built once per test session by tests/test_runtime_matrix.py (5.x side: parents, surgeries,
reference logits); the other runtimes run in as few processes as possible, since each costs
seconds of imports: one `python tests/runtime_matrix.py transformers JOBS` under .venv-457 loads
every child, one converter process (llama.cpp's own, run by .venv-457's python as its
requirements pin transformers 4.57.6) converts every child, and one `python tests/runtime_matrix.py
llama.cpp JOBS` evaluates every GGUF. Logits travel as .npy files beside each model.

Tiny random models (tests/tiny.py) with SmolLM2's real tokenizer (a tokenizer llama.cpp's
converter recognises), so vocab 49152 at hidden size 64.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

VOCAB = 49152
SEQ = 64
TEXT = "Upcycling keeps the function: 3 experts, 1 router.\nÜber naïve café — 東京 ok?"
ROPE = {
    "default": {},
    "linear": {"factor": 2.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 64},
}


@dataclass(frozen=True)
class Parent:
    family: str
    form: str  # "4x" (top-level rope_theta / rope_scaling) or "5x" (rope_parameters only, TokenizersBackend)
    rope: str = "default"
    tied: bool = False
    theta: float = 1e5  # never a class default, so a lost theta shows

    @property
    def name(self) -> str:
        return f"{self.family}-{self.form}-{self.rope}" + ("-tied" if self.tied else "")


@dataclass(frozen=True)
class Child:
    name: str
    source: str  # a Parent's name or another Child's name
    command: tuple[str, ...]  # moekit command and options; SOURCE and OUTPUT are inserted
    parent: str  # whose 5.x logits are the reference ("" : the child's own 5.x logits)


TIED = {"llama", "qwen2", "olmo2"}  # tied parents exercise the lm_head written for runtimes that never tie
THETA = {"qwen2": 1e6}  # Qwen2.5's theta


def parents() -> list[Parent]:
    from tests.tiny import DENSE

    made = [Parent(f, form, tied=f in TIED, theta=THETA.get(f, 1e5)) for f in DENSE for form in ("4x", "5x")]
    made += [Parent("llama", form, rope) for rope in ("linear", "llama3", "yarn") for form in ("4x", "5x")]
    return made


def children() -> list[Child]:
    from moekit.arch.targets import TARGETS

    by_name = {p.name: p for p in parents()}
    out = []
    for p in by_name.values():
        if p.rope != "default":
            out.append(Child(f"{p.name}__mixtral", p.name, ("upcycle", "-n", "4", "-k", "2"), p.name))
            continue
        for t in TARGETS.values():
            if p.family not in t.parents:
                continue
            shared = ("--shared-experts", str(t.shared_range[1])) if t.shared_range[1] else ()
            out.append(Child(f"{p.name}__{t.model_type}", p.name,
                             ("upcycle", "-n", "4", "-k", "2", "--target", t.model_type, *shared), p.name))
            if t.softmax_topk:
                out.append(Child(f"{p.name}__{t.model_type}-softmax-topk", p.name,
                                 ("upcycle", "-n", "4", "-k", "2", "--target", t.model_type, *shared,
                                  "--routing", "softmax-topk"), p.name))
    for moe, parent in (("llama-5x-default-tied__mixtral", "llama-5x-default-tied"),
                        ("qwen3-5x-default__qwen3_moe", "qwen3-5x-default"),
                        ("qwen2-5x-default-tied__qwen2_moe-softmax-topk", "qwen2-5x-default-tied"),
                        ("granite-5x-default__granitemoe", "granite-5x-default"),  # fused expert layout
                        ("llama-5x-default-tied__glm4_moe", "llama-5x-default-tied")):  # sigmoid router
        out.append(Child(f"{moe}__split", moe, ("split-granularity", "-g", "2"), parent))
        out.append(Child(f"{moe}__add", moe, ("add-experts", "-m", "2", "--copy-from", "0", "--drift-tokens", "0"),
                         parent if "softmax" not in moe else ""))  # a softmax over more experts: not exact
    # Pruning an upcycled model (identical experts, renormalised routing) keeps the parent's function;
    # pruning one with distinct experts is checked against its own 5.x logits.
    for moe, parent in (("llama-5x-default-tied__mixtral", "llama-5x-default-tied"),
                        ("qwen3-5x-default__qwen3_moe", "qwen3-5x-default")):
        out.append(Child(f"{moe}__prune", moe, ("prune", "--keep", "3", "--method", "random"), parent))
    out.append(Child("llama-5x-default-tied__mixtral-noisy", "llama-5x-default-tied",
                     ("upcycle", "-n", "4", "-k", "2", "--noise", "0.05", "--seed", "1"), ""))
    out.append(Child("llama-5x-default-tied__mixtral-noisy__prune", "llama-5x-default-tied__mixtral-noisy",
                     ("prune", "--keep", "3", "--method", "random", "--seed", "2"), ""))
    out.append(Child("llama-5x-default-tied__mixtral__add__train", "llama-5x-default-tied__mixtral__add",
                     ("train", "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--device", "cpu",
                      "--bias-update-rate", "0"), ""))
    return out


def input_ids() -> list[int]:
    import torch

    return torch.randint(0, VOCAB, (SEQ,), generator=torch.Generator().manual_seed(1234)).tolist()


# --- the other runtimes' side: `python tests/runtime_matrix.py transformers|llama.cpp JOBS` ---------


def transformers_logits(jobs: dict) -> dict:
    """Load each model with this interpreter's transformers; write its logits beside it."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    ids, results = torch.tensor([jobs["ids"]]), {}
    for name, folder in jobs["models"].items():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
            with torch.no_grad():
                np.save(Path(folder) / f"logits-{jobs['tag']}.npy", model.eval()(ids).logits[0].numpy())
            tokens = AutoTokenizer.from_pretrained(folder)(jobs["text"])["input_ids"]
            results[name] = {"ok": True, "problems": {k: sorted(v)[:3] for k, v in info.items() if v}, "tokens": tokens}
        except Exception as e:  # a model this line cannot load is a measured cell, not a crash
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}
    return results


def llamacpp_logits(jobs: dict) -> dict:
    import numpy as np

    from moekit.runtime.llamacpp import logits

    results = {}
    for name, gguf in jobs["models"].items():
        try:
            np.save(Path(gguf).with_suffix(".npy"), logits(Path(gguf), [jobs["ids"]], threads=2)[0])
            results[name] = {"ok": True}
        except Exception as e:
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return results


if __name__ == "__main__":
    mode, jobs_file = sys.argv[1], Path(sys.argv[2])
    jobs = json.loads(jobs_file.read_text())
    run = {"transformers": transformers_logits, "llama.cpp": llamacpp_logits}[mode]
    jobs_file.with_suffix(f".{mode}.out.json").write_text(json.dumps(run(jobs)))
