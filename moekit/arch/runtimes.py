"""Which runtimes compute a checkpoint's function, per MoE architecture, as data.

One table for everything that talks about runtimes: the warnings a surgery prints when its
output will not compute its parent's function somewhere, the model card's caveats, `inspect`'s
list of runtimes, and the runtime matrix test (tests/test_runtime_matrix.py), which measures every
"measured" cell and fails when a runtime starts or stops doing what this table says.

A cell is the verdict for one (architecture, runtime); `exceptions` are (condition, verdict)
pairs checked in order, the first condition that holds for the checkpoint wins. Conditions are
named predicates on what a checkpoint says about itself (config, tensor names, tokenizer text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

RUNTIMES = ("transformers 5.x", "transformers 4.57", "llama.cpp", "vLLM")
LLAMA_CPP = "llama-cpp-python 0.3.36 (vendored llama.cpp 0c1e57098bba43ac29e6e3b677cdceebdd22334f)"
VLLM = "vLLM model classes read at upstream commits listed in docs/runtimes.md"

EXACT, WRONG, FAILS = "exact", "wrong", "fails"  # computes the function / runs but computes another / does not load


@dataclass(frozen=True)
class Verdict:
    status: str  # EXACT | WRONG | FAILS
    why: str = ""  # one line: what goes wrong and what to do about it
    how: str = "measured"  # "measured" (the matrix test checks it) | "read, not run" | "not measured"
    sign: str = ""  # FAILS, measured: a piece of the runtime's own error message (the test looks for it)


@dataclass(frozen=True)
class Facts:
    """What a checkpoint says about itself, enough to evaluate every condition below."""

    config: dict
    tensors: frozenset[str] = frozenset()
    tokenizer_text: str = ""  # tokenizer.json + tokenizer_config.json, for special-token checks

    @classmethod
    def of_folder(cls, folder: Path, config: dict | None = None, tensors=None) -> Facts:
        folder = Path(folder)
        text = "".join((folder / f).read_text(errors="replace") for f in ("tokenizer.json", "tokenizer_config.json")
                       if (folder / f).is_file())
        if config is None:
            config = json.loads((folder / "config.json").read_text())
        return cls(config, frozenset(tensors or ()), text)


def _tied_without_lm_head(f: Facts) -> bool:
    return bool(f.config.get("tie_word_embeddings")) and "lm_head.weight" not in f.tensors


def _theta_only_in_rope_parameters(f: Facts) -> bool:
    params = f.config.get("rope_parameters")
    return isinstance(params, dict) and "rope_theta" in params and "rope_theta" not in f.config


CONDITIONS: dict[str, Callable[[Facts], bool]] = {
    "renormalised": lambda f: f.config.get("norm_topk_prob") is True,
    "not_renormalised": lambda f: f.config.get("norm_topk_prob") is False,
    "tied_without_lm_head": _tied_without_lm_head,
    "non_glm_tokenizer": lambda f: not all(t in f.tokenizer_text for t in ("[gMASK]", "<|user|>", "<|observation|>")),
    "head_dim_not_hidden_over_heads": lambda f: f.config.get("head_dim", 0) not in (
        0, f.config.get("hidden_size", 0) // max(f.config.get("num_attention_heads", 1), 1)),
    "theta_only_in_rope_parameters": _theta_only_in_rope_parameters,
    "tokenizers_backend": lambda f: '"TokenizersBackend"' in f.tokenizer_text,
}


@dataclass(frozen=True)
class Cell:
    default: Verdict
    exceptions: tuple[tuple[str, Verdict], ...] = ()

    def verdict(self, facts: Facts) -> Verdict:
        return next((v for cond, v in self.exceptions if CONDITIONS[cond](facts)), self.default)


_OK = Cell(Verdict(EXACT))
_OK_READ = Cell(Verdict(EXACT, how="read, not run"))
_457 = Cell(Verdict(EXACT), (
    ("theta_only_in_rope_parameters", Verdict(WRONG, "RoPE theta only in rope_parameters (a transformers 5.x save): "
                                                     "4.57 falls back to the class default theta; re-save with moekit")),
    ("tokenizers_backend", Verdict(FAILS, "tokenizer_class TokenizersBackend (a transformers 5.x save) does not load "
                                          "in 4.57; moekit writes PreTrainedTokenizerFast")),
))
_VLLM_UNTIED = ("tied_without_lm_head", Verdict(FAILS, "vLLM never ties lm_head to the embeddings: the checkpoint "
                                                       "needs lm_head.weight (moekit writes it)", "read, not run"))

TABLE: dict[str, dict[str, Cell]] = {
    "mixtral": {"llama.cpp": _OK, "vLLM": _OK_READ},
    "qwen3_moe": {
        "llama.cpp": Cell(Verdict(EXACT), (
            ("not_renormalised", Verdict(WRONG, "llama.cpp's qwen3moe always renormalises the top-k weights (ignores "
                                                "norm_topk_prob: false); for llama.cpp keep --routing renormalised")),
        )),
        "vLLM": _OK_READ,
    },
    "granitemoe": {"llama.cpp": _OK, "vLLM": _OK_READ},
    "granitemoeshared": {"llama.cpp": _OK, "vLLM": _OK_READ},
    "qwen2_moe": {
        "llama.cpp": Cell(Verdict(EXACT), (
            ("tied_without_lm_head", Verdict(FAILS, "llama.cpp's qwen2moe has no tied-embedding fallback "
                                                    "(tensor 'output.weight' not found); moekit writes lm_head.weight", sign="output.weight")),
            ("renormalised", Verdict(WRONG, "llama.cpp's qwen2moe never renormalises the top-k weights "
                                            "(ignores norm_topk_prob: true); upcycle with --routing softmax-topk")),
        )),
        "vLLM": Cell(Verdict(EXACT, how="read, not run"), (
            ("head_dim_not_hidden_over_heads", Verdict(WRONG, "vLLM's Qwen2-MoE takes head_dim = hidden_size / "
                                                              "num_attention_heads", "read, not run")),
        )),
    },
    "glm4_moe": {
        "llama.cpp": Cell(Verdict(EXACT, how="not measured"), (
            ("non_glm_tokenizer", Verdict(FAILS, "llama.cpp's converter looks up GLM's own special tokens ([gMASK], "
                                                 "<|user|>, <|observation|>) and fails on any other tokenizer", sign="[gMASK]")),
        )),
        "vLLM": Cell(Verdict(EXACT, how="read, not run"), (_VLLM_UNTIED,)),
    },
    "flex_olmo": {
        "llama.cpp": Cell(Verdict(FAILS, "llama.cpp has no FlexOlmo architecture (its converter refuses "
                                         "FlexOlmoForCausalLM)", sign="FlexOlmoForCausalLM is not supported")),
        "vLLM": Cell(Verdict(EXACT, how="read, not run"), (
            _VLLM_UNTIED,
            ("renormalised", Verdict(WRONG, "vLLM's FlexOlmo hard-codes renormalize=False (ignores norm_topk_prob: "
                                            "true); upcycle with --routing softmax-topk", "read, not run")),
        )),
    },
}


def cell(model_type: str, runtime: str) -> Cell | None:
    if model_type not in TABLE:
        return None
    if runtime == "transformers 5.x":
        return _OK
    if runtime == "transformers 4.57":
        return _457
    return TABLE[model_type].get(runtime)


def verdicts(facts: Facts) -> dict[str, Verdict]:
    """runtime -> verdict for a checkpoint of an architecture in the table (empty otherwise)."""
    model_type = facts.config.get("model_type", "")
    return {r: c.verdict(facts) for r in RUNTIMES if (c := cell(model_type, r)) is not None}


def caveats(facts: Facts) -> list[str]:
    """One line per runtime where the checkpoint will not compute its function (warnings, model card)."""
    return [f"{runtime}: {v.why}" + (" (vLLM source read, not run)" if v.how == "read, not run" else "")
            for runtime, v in verdicts(facts).items() if v.status != EXACT]


def report(facts: Facts) -> list[dict]:
    """`inspect`'s list: each runtime with its verdict for this checkpoint, how it is known, and why."""
    return [{"runtime": r, "status": v.status, "how": v.how, **({"why": v.why} if v.why else {})}
            for r, v in verdicts(facts).items()]
