"""Data-driven router rows for upcycling.

An upcycled layer starts with N identical experts, so its output does not depend on the router
(BRIEF §2); the router only decides which experts will *specialise* once training starts. Rows
taken from the data give each expert a distinct region of the space the router actually sees,
instead of a random projection:

- k-means: cluster the hidden states that enter the layer's MLP (= what the new router will
  receive) on calibration text; one centroid per expert (LLaMA-MoE v2).
- prompts: mergekit-moe's "hidden" gate mode; expert i's row points at the mean hidden state of
  prompts describing its domain, minus the mean of negative prompts.

Everything here is plain torch + transformers: no CLI, no printing, no downloads.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path
from typing import Iterable

import torch

from moekit.errors import MoekitError
from moekit.runtime.capture import collect_mlp_inputs_from_ids, prompt_mlp_inputs


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text`, without the special tokens a tokenizer may add on its own."""
    return list(tokenizer.encode(text, add_special_tokens=False))


# --------------------------------------------------------------------------- MLP inputs of calibration text


def pack_token_ids(docs: Iterable[list[int]], seq_len: int, separator: int | None) -> list[torch.Tensor]:
    """Documents joined into one stream (with `separator` between them) and cut into [1, seq_len]
    rows: every position is a real token, so no padding or attention mask is needed. A shorter
    remainder becomes the last row, unless it is a single token (nothing to keep after position 0)."""
    stream: list[int] = []
    for ids in docs:
        if ids:
            stream.extend(ids + ([separator] if separator is not None else []))
    rows = [stream[s : s + seq_len] for s in range(0, len(stream), seq_len)]
    return [torch.tensor([r]) for r in rows if len(r) > 1]


def collect_mlp_inputs(
    model, texts: list[str], tokenizer, layers: list[int], max_tokens: int, seq_len: int, device, batch_size: int = 8
) -> dict[int, torch.Tensor]:
    """`collect_mlp_inputs_from_ids` on calibration text: tokenised, packed into seq_len rows."""
    separator = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    # Tokenise only what can be used: max_tokens, the skipped first position of each row, a row of slack.
    docs, budget = [], max_tokens + max_tokens // max(seq_len - 1, 1) + seq_len
    for text in texts:
        if budget <= 0:
            break
        docs.append(encode(tokenizer, text))
        budget -= len(docs[-1]) + 1
    rows = pack_token_ids(docs, seq_len, separator)
    # Full rows batch together; the shorter last row (if any) runs on its own.
    full = [r for r in rows if r.shape[1] == seq_len]
    batches = [torch.cat(full[s : s + batch_size]) for s in range(0, len(full), batch_size)]
    batches += [r for r in rows if r.shape[1] != seq_len]
    return collect_mlp_inputs_from_ids(model, batches, layers, max_tokens, device)


def calibration_mlp_inputs(source, layers: list[int], calibration, max_tokens: int, device,
                           allow_pickle: bool = False) -> dict[int, torch.Tensor]:
    """MLP inputs of `layers` on calibration text (a user's file, or the built-in sample), with the
    model loaded by `from_pretrained` (which maps per-expert keys onto 5.x's fused experts)."""
    from moekit.hf import load_model, load_tokenizer

    model, tokenizer = load_model(source, torch.float32, device, allow_pickle=allow_pickle)[0], load_tokenizer(source)
    texts = read_text_file(calibration) if calibration else builtin_calibration_text()
    return collect_mlp_inputs(model, texts, tokenizer, layers, max_tokens, seq_len=512, device=device)


# --------------------------------------------------------------------------- k-means rows


def balanced_kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine similarity on L2-normalised rows) with k-means++ seeding.

    Returns [k, H] unit centroids, every one with at least one point assigned to it: a cluster
    that empties is re-seeded with the point its current centroid fits worst, taken from a
    cluster that can spare it. An empty cluster would become an expert the router never picks.
    Cosine, not Euclidean: the router's logit is a dot product, and the norm of a token's hidden
    state says little about what it is about.
    """
    if x.shape[0] < k:
        raise MoekitError(f"k-means needs at least {k} hidden states, got {x.shape[0]}; use more calibration text")
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    gen = torch.Generator(device=x.device).manual_seed(seed)

    # k-means++: each new centroid is drawn with probability proportional to its squared
    # distance to the nearest centroid so far (2 - 2cos for unit vectors).
    def distance(centre):  # points equal up to rounding count as equal: no centroid is picked twice
        d = 1 - x @ centre
        return torch.where(d > 1e-6, d, torch.zeros_like(d))

    c = x[torch.randint(x.shape[0], (1,), generator=gen, device=x.device)]
    dist = distance(c[0])
    for _ in range(1, k):
        if dist.sum() <= 0:
            raise MoekitError(f"k-means: fewer than {k} distinct hidden states; use more (or more varied) calibration text")
        pick = torch.multinomial(dist, 1, generator=gen)
        c = torch.cat([c, x[pick]])
        dist = torch.minimum(dist, distance(x[pick][0]))

    for _ in range(iters):
        sim = x @ c.T
        labels = _fill_empty(sim, sim.argmax(dim=1), k)
        # cluster sums as a matmul: index_add_ is ~50x slower on CPU
        new = torch.nn.functional.normalize(torch.nn.functional.one_hot(labels, k).to(x.dtype).T @ x, dim=-1)
        done = torch.allclose(new, c, atol=1e-6)
        c = new
        if done:
            break
    return c


def _fill_empty(sim: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    counts = torch.bincount(labels, minlength=k)
    empty = (counts == 0).nonzero().flatten().tolist()
    if not empty:
        return labels
    labels = labels.clone()
    fit = sim.gather(1, labels[:, None]).flatten()
    for j in empty:
        # the worst-fitting point among clusters that keep at least one point after giving it up
        donors = counts[labels] > 1
        p = torch.where(donors, fit, torch.inf).argmin()
        counts[labels[p]] -= 1
        counts[j] += 1
        labels[p] = j
        fit[p] = torch.inf  # fits its own cluster perfectly now; never move it again
    return labels


def scale_to_logit_std(rows: torch.Tensor, x: torch.Tensor, target: float = 1.0) -> torch.Tensor:
    """`rows` times one factor so that the router logits `x @ rows.T` have, per token, a standard
    deviation across experts of `target` on average (RMS over tokens).

    Why: unit centroids give logits |x|·cos, and |x| of an MLP input ranges from ~1 to ~100s
    depending on the norm weights of the layer and the family (OLMo-2 routes the raw residual), so
    the raw centroids make some layers' softmax one-hot (no gradient reaches the other experts,
    and the router cannot learn) and others' uniform (the choice is noise). A spread of ~1 logit
    across experts makes the centroid choice decisive for top-K (the nearest centroid wins by
    e^1-ish ratios) while every expert keeps a probability the gradient can move; it is the same
    for every layer and model, and it only rescales rows, so the k-means ranking is unchanged.
    Only the spread across experts matters: softmax ignores a shift common to all experts.
    """
    logits = x.float() @ rows.T
    spread = logits.std(dim=1, unbiased=False).pow(2).mean().sqrt()
    return rows * (target / spread.clamp(min=1e-12))


def kmeans_router_rows(
    states: dict[int, torch.Tensor], n_experts: int, iters: int = 50, seed: int = 0, logit_std: float = 1.0
) -> dict[int, torch.Tensor]:
    """Per layer, [N, H] router rows: k-means centroids of that layer's MLP inputs, scaled by
    `scale_to_logit_std` (LLaMA-MoE v2 uses centroids as they are; see there for why not).

    The k-means is seeded per layer with `seed + layer`, so the same seed reproduces the rows.
    """
    rows = {}
    for layer, x in states.items():
        centroids = balanced_kmeans(x, n_experts, iters=iters, seed=seed + layer)
        rows[layer] = scale_to_logit_std(centroids, x, logit_std)
    return rows


# --------------------------------------------------------------------------- prompt rows


def prompt_router_rows(
    model, tokenizer, positive: list[list[str]], negative: list[str], layers: list[int], device
) -> dict[int, torch.Tensor]:
    """Per layer, [N, H] unit router rows from prompts (mergekit-moe's "hidden" gate mode).

    Expert i's row is the mean MLP input over `positive[i]` minus the mean over `negative` (when
    given), normalised to unit length. Differences from mergekit, on purpose: the states are the
    MLP inputs (what the router receives), not the residual stream before the layer's attention;
    each prompt is averaged over its tokens (mergekit's default keeps only the last position,
    which with right padding can be a pad token); every prompt weighs the same in the mean.
    Negative prompts remove the component all prompts share, which otherwise dominates every row
    and makes the experts' rows nearly parallel.
    """
    if not positive or any(not p for p in positive):
        raise MoekitError("prompt router init needs at least one positive prompt for every expert")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def mean_state(prompts: list[str]) -> dict[int, torch.Tensor]:
        ids = [bos + encode(tokenizer, p) for p in prompts]
        if any(len(i) <= len(bos) for i in ids):
            raise MoekitError("a router prompt tokenises to nothing; remove empty prompts")
        return {i: s.mean(dim=0) for i, s in prompt_mlp_inputs(model, ids, layers, device).items()}

    per_expert = [mean_state(p) for p in positive]
    neg = mean_state(negative) if negative else None
    rows = {}
    for layer in layers:
        r = torch.stack([e[layer] for e in per_expert])
        if neg is not None:
            r = r - neg[layer]
        rows[layer] = torch.nn.functional.normalize(r, dim=-1)
    return rows


# --------------------------------------------------------------------------- calibration text

# Stdlib modules with long, prose-heavy docstrings (module, class and function level).
_DOC_MODULES = ("argparse", "difflib", "textwrap", "heapq", "bisect", "fractions", "decimal", "pickle",
                "threading", "subprocess", "shutil", "tarfile", "zipfile", "logging/__init__", "email/message",
                "http/client", "http/cookiejar", "unittest/case", "collections/__init__", "functools", "inspect",
                "typing", "dataclasses", "enum", "datetime", "calendar", "locale", "gettext", "random", "statistics")


def builtin_calibration_text(max_chars: int = 200_000) -> list[str]:
    """Real English text that ships with every Python install, as paragraphs: the prose of the
    stdlib's LICENSE.txt, then docstrings of a fixed list of stdlib modules. Deterministic for a
    given Python version; no download."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paragraphs: list[str] = []
    license_file = stdlib / "LICENSE.txt"
    if license_file.is_file():  # some distributions strip it
        paragraphs += _paragraphs(license_file.read_text(encoding="utf-8", errors="replace"))
    for module in _DOC_MODULES:
        source = stdlib / f"{module}.py"
        if not source.is_file():
            continue
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    paragraphs += _paragraphs(doc)
    prose = [p for p in paragraphs if _is_prose(p)]
    out, total = [], 0
    for p in prose:
        if total >= max_chars:
            break
        out.append(p[: max_chars - total])
        total += len(out[-1])
    if not out:
        raise MoekitError(f"{stdlib}: found no built-in calibration text; pass a text file with --calibration")
    return out


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, each with its wrapped lines joined by single spaces."""
    blocks = [b for b in text.replace("\r\n", "\n").split("\n\n")]
    return [" ".join(line.strip() for line in b.splitlines() if line.strip()) for b in blocks if b.strip()]


def _is_prose(p: str) -> bool:
    """Sentences rather than code samples, tables or rulers: long enough, mostly letters."""
    if len(p) < 80 or p.startswith(">>>") or "===" in p or "---" in p:
        return False
    letters = sum(ch.isalpha() or ch.isspace() for ch in p)
    return letters / len(p) > 0.85


def read_text_file(path: str | Path) -> list[str]:
    """A user's calibration file: `.jsonl` (one JSON object per line, its "text" field) or plain
    text (any other suffix; split into paragraphs at blank lines)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MoekitError(f"{path}: no such calibration file")
    try:
        with open(path, encoding="utf-8") as f:
            raw = f.read()
    except UnicodeDecodeError:
        raise MoekitError(f"{path}: not UTF-8 text; calibration files are .txt or .jsonl") from None
    except OSError as e:
        raise MoekitError(f"{path}: cannot read it: {(e.strerror or str(e)).lower()}") from None
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise MoekitError(f"{path}:{n}: not valid JSON ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise MoekitError(f'{path}:{n}: expected an object with a "text" string')
            if text.strip():
                texts.append(text)
    else:
        texts = [p for p in (b.strip() for b in raw.replace("\r\n", "\n").split("\n\n")) if p]
    if not texts:
        raise MoekitError(f"{path}: no text in it")
    return texts
