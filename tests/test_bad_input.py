"""Hostile and careless input, across every command (issue 12).

Every case asserts: the exit code the README documents, exactly one `error:` line (plus at most
one `hint:` line for a usage error) and nothing else on stderr, no traceback, every input's
sha256 unchanged, and nothing left where the output would go. Cases run in this process
(`run_moekit`) unless process behaviour is under test: signals, stdin and remote code run in
subprocesses. Tiny models are built once per session.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.checkpoint.writer import TEMP_MARKER
from tests import tiny
from tests.conftest import run_moekit

README = Path(__file__).parent.parent / "README.md"
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def documented_exit_codes() -> dict[int, str]:
    """The README's exit-code table: code -> meaning."""
    section = README.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {int(m.group(1)): m.group(2).strip() for m in re.finditer(r"^\| (\d+) \| (.+) \|$", section, re.M)}


CODES = documented_exit_codes()


# --------------------------------------------------------------------------- models and mutations


@pytest.fixture(scope="session")
def models(tmp_path_factory, tiny_models) -> dict[str, Path]:
    """Tiny models with a character tokenizer: dense (llama), MoE (mixtral), sigmoid MoE (glm4_moe)."""
    root = tmp_path_factory.mktemp("bad-input-models")
    return {name: tiny.with_char_tokenizer(tiny_models(kind), root / name)
            for name, kind in (("dense", "llama"), ("moe", "mixtral"), ("glm", "glm4_moe"))}


def tree_hash(path: Path) -> str:
    """sha256 over every file under `path` (names and bytes), or of the file itself."""
    h = hashlib.sha256()
    if path.is_symlink() or not path.exists():
        return f"link:{os.readlink(path)}" if path.is_symlink() else "absent"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode("utf-8", "surrogateescape"))
        try:
            h.update(f.read_bytes())
        except OSError:
            h.update(b"unreadable")
    return h.hexdigest()


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, drop: tuple[str, ...] = (), **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for key in drop:
        cfg.pop(key, None)
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_tensors(folder: Path, keep: Callable[[str], bool] = lambda n: True, change: dict | None = None) -> None:
    state = load_file(folder / "model.safetensors")
    state = {n: t for n, t in state.items() if keep(n)}
    state.update(change or {})
    save_file(state, folder / "model.safetensors")


def to_shards(folder: Path, lie: Callable[[dict, dict], None] | None = None) -> None:
    """Split model.safetensors into two shards with an index; `lie(weight_map, shards)` edits them."""
    state = load_file(folder / "model.safetensors")
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {n: f for f, ns in shards.items() for n in ns}
    if lie:
        lie(weight_map, shards)
    for f, ns in shards.items():
        save_file({n: state[n] for n in ns}, folder / f)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def to_pickle(folder: Path) -> None:
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/moekit-pickle-ran",))


def evil_pickle(folder: Path) -> None:
    """A pytorch_model.bin (torch.save's zip format) whose unpickling would run a shell command."""
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save({**state, "model.embed_tokens.weight": _Evil()}, folder / "pytorch_model.bin")


def remote_code_folder(src: Path, dst: Path, marker: Path, known_type: bool = True) -> Path:
    """A copy of `src` whose config and tokenizer config name custom code that would create `marker`."""
    copy_model(src, dst)
    code = f"open({str(marker)!r}, 'w').write('custom code ran')\n"
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (dst / f"{module}.py").write_text(code + "from transformers import PretrainedConfig, PreTrainedTokenizerFast\n"
                                          "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
                                          "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    edit_config(dst, auto_map=auto_map, **({} if known_type else {"model_type": "evil"}))
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    tok.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]})
    (dst / "tokenizer_config.json").write_text(json.dumps(tok))
    return dst


# --------------------------------------------------------------------------- the one assertion


def assert_clean_failure(proc, code: int, match: str | None) -> None:
    assert code in CODES, f"exit {code} is not in the README's table"
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}:\n{proc.stderr}{proc.stdout}"
    text = proc.stderr + proc.stdout
    assert "Traceback" not in text and "internal error" not in text
    lines = proc.stderr.splitlines()
    if code == 0:
        assert not any(line.startswith("error:") for line in lines), proc.stderr
        return
    errors = [line for line in lines if line.startswith("error:")]
    hints = [line for line in lines if line.startswith("hint:")]
    assert len(errors) == 1 and lines[0] == errors[0], f"not one error line first:\n{proc.stderr}"
    assert len(hints) <= (1 if code == 2 else 0), proc.stderr
    assert len(lines) == 1 + len(hints), f"more than the error line:\n{proc.stderr}"
    if match:
        assert match.lower() in errors[0].lower(), errors[0]


@dataclass
class World:
    """A case's folders: `inputs` are hashed before and after; `out_dir` must stay empty."""

    tmp: Path
    models: dict[str, Path]
    inputs: list[Path] = field(default_factory=list)
    monkeypatch: pytest.MonkeyPatch | None = None
    cleanup: list[Callable[[], None]] = field(default_factory=list)  # undone after the case

    @property
    def out_dir(self) -> Path:
        return self.tmp / "o"

    @property
    def out(self) -> Path:
        return self.out_dir / "out"

    def copy(self, name: str, as_name: str = "src") -> Path:
        dst = copy_model(self.models[name], self.tmp / as_name)
        self.inputs.append(dst)
        return dst

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        self.inputs.append(path)
        return path


@pytest.fixture
def world(tmp_path, models, monkeypatch) -> World:
    w = World(tmp_path, models, inputs=list(models.values()), monkeypatch=monkeypatch)
    w.out_dir.mkdir()
    yield w
    for undo in w.cleanup:
        undo()


def run_case(world: World, args: list[str], code: int, match: str | None, runner=run_moekit):
    before = {p: tree_hash(p) for p in world.inputs}
    proc = runner(*[str(a) for a in args])
    assert_clean_failure(proc, code, match)
    assert {p: tree_hash(p) for p in world.inputs} == before, "an input changed"
    left = sorted(p.name for p in world.out_dir.iterdir())
    if code == 0:
        return proc
    assert left == [], f"left behind: {left}"
    return proc


# --------------------------------------------------------------------------- cases run in this process

# (id, setup(world) -> placeholders, args, exit code, text the error line must hold)
Case = tuple[str, Callable[[World], dict], list[str], int, str | None]


def _dense(w: World, **cfg):
    src = w.copy("dense")
    if cfg:
        edit_config(src, **cfg)
    return {"src": src}


def _drop(pattern: str, kind: str = "dense"):
    def setup(w: World):
        src = w.copy(kind)
        edit_tensors(src, keep=lambda n: not re.search(pattern, n))
        return {"src": src}
    return setup


def _config_text(content: bytes | str, kind: str = "dense"):
    def setup(w: World):
        src = w.copy(kind)
        (src / "config.json").write_bytes(content.encode() if isinstance(content, str) else content)
        return {"src": src}
    return setup


def _weights_bytes(transform: Callable[[bytes], bytes]):
    def setup(w: World):
        src = w.copy("dense")
        f = src / "model.safetensors"
        f.write_bytes(transform(f.read_bytes()))
        return {"src": src}
    return setup


def _sharded(lie=None, then: Callable[[Path], None] | None = None, kind: str = "dense"):
    def setup(w: World):
        src = w.copy(kind)
        to_shards(src, lie)
        if then:
            then(src)
        return {"src": src}
    return setup


def _retype(pattern: str, dtype: torch.dtype, kind: str = "dense"):
    def setup(w: World):
        src = w.copy(kind)
        state = load_file(src / "model.safetensors")
        edit_tensors(src, change={n: t.to(dtype) for n, t in state.items() if re.search(pattern, n)})
        return {"src": src}
    return setup


def _index(content):
    return _sharded(then=lambda src: (src / "model.safetensors.index.json").write_text(
        content if isinstance(content, str) else json.dumps(content)))


def _pickled(kind: str):
    def setup(w: World):
        src = w.copy(kind)
        to_pickle(src)
        return {"src": src}
    return setup


def _evil_pickle(w: World):
    src = w.copy("dense")
    evil_pickle(src)
    return {"src": src}


def _moe(kind: str = "moe", drop: str | None = None, **cfg):
    def setup(w: World):
        src = w.copy(kind)
        if drop:
            edit_tensors(src, keep=lambda n: not re.search(drop, n))
        if cfg:
            edit_config(src, **cfg)
        return {"src": src}
    return setup


def _with_file(name: str, content: bytes | str, kind: str = "dense"):
    def setup(w: World):
        return {"src": w.copy(kind), "file": w.file(name, content)}
    return setup


def _plain(kind: str = "dense"):
    return lambda w: {"src": w.copy(kind)}


def _lie_missing_tensor(weight_map, shards):
    name = shards["model-00002-of-00002.safetensors"].pop()  # the index still names it there
    assert name in weight_map


def _lie_wrong_shard(weight_map, shards):
    name = shards["model-00001-of-00002.safetensors"][0]
    weight_map[name] = "model-00002-of-00002.safetensors"


def _lie_unlisted(weight_map, shards):
    weight_map.pop(shards["model-00001-of-00002.safetensors"][0])


def _lie_twice(weight_map, shards):
    shards["model-00002-of-00002.safetensors"].append(shards["model-00001-of-00002.safetensors"][0])


def _header_length_lies(raw: bytes) -> bytes:
    return (10**12).to_bytes(8, "little") + raw[8:]


U = ["upcycle", "{src}", "{out}", "-n", "2", "-k", "1"]
COMMANDS = ["inspect", "convert", "upcycle", "verify", "split-granularity", "add-experts", "train", "profile", "balance",
            "prune"]

CASES: list[Case] = [
    # class 2: a source that lacks what its architecture needs is refused before anything is written
    ("upcycle/missing-k_proj", _drop(r"layers\.1\.self_attn\.k_proj"), U, 3, "k_proj"),
    ("upcycle/missing-embed_tokens", _drop(r"embed_tokens"), U, 3, "embed_tokens"),
    ("upcycle/layer-without-ffn", _drop(r"layers\.1\.mlp\."), U, 3, "layers.1.mlp"),
    ("upcycle/missing-lm_head", _drop(r"^lm_head"), U, 3, "lm_head"),
    ("upcycle/missing-norm", _drop(r"layers\.0\.input_layernorm"), U, 3, "input_layernorm"),
    ("upcycle/missing-down_proj", _drop(r"layers\.0\.mlp\.down_proj"), U, 3, "down_proj"),
    ("upcycle/index-names-a-tensor-its-shard-lacks", _sharded(_lie_missing_tensor), U, 3, "no shard holds"),
    ("convert/index-names-a-tensor-its-shard-lacks", _sharded(_lie_missing_tensor), ["convert", "{src}", "{out}"], 3, "no shard holds"),
    ("convert/index-puts-a-tensor-in-the-wrong-shard", _sharded(_lie_wrong_shard), ["convert", "{src}", "{out}"], 3, "disagree"),
    ("convert/index-omits-a-tensor", _sharded(_lie_unlisted), ["convert", "{src}", "{out}"], 3, "does not list"),
    ("convert/tensor-in-two-shards", _sharded(_lie_twice), ["convert", "{src}", "{out}"], 3, "two shards"),
    ("inspect/index-names-a-tensor-its-shard-lacks", _sharded(_lie_missing_tensor), ["inspect", "{src}"], 3, "no shard holds"),
    ("split/moe-layer-without-router", _moe(drop=r"layers\.1\.block_sparse_moe\.gate\."), ["split-granularity", "{src}", "{out}", "-g", "2"], 3, "no router"),
    ("split/missing-expert", _moe(drop=r"layers\.0\.block_sparse_moe\.experts\.3\.w2"), ["split-granularity", "{src}", "{out}", "-g", "2"], 3, "experts.3.w2"),
    ("split/missing-attention", _moe(drop=r"layers\.1\.self_attn\.v_proj"), ["split-granularity", "{src}", "{out}", "-g", "2"], 3, "v_proj"),
    ("split/config-experts-disagree", _moe(num_local_experts=8), ["split-granularity", "{src}", "{out}", "-g", "2"], 3, "experts.4"),
    ("split/glm-missing-bias", _moe("glm", drop=r"layers\.1\.mlp\.gate\.e_score"), ["split-granularity", "{src}", "{out}", "-g", "2"], 3, "e_score_correction_bias"),
    ("add-experts/moe-layer-without-router", _moe(drop=r"layers\.0\.block_sparse_moe\.gate\."), ["add-experts", "{src}", "{out}", "-m", "1", "--init", "mean"], 3, "no router"),
    ("add-experts/width-disagrees", _moe(intermediate_size=100), ["add-experts", "{src}", "{out}", "-m", "1", "--init", "mean"], 3, "shape"),
    ("add-experts/dense-missing-k_proj", _drop(r"layers\.0\.self_attn\.k_proj"), ["add-experts", "{src}", "{out}", "-m", "1", "--init", "mean"], 3, "k_proj"),
    ("upcycle/integer-weights", _retype(r"layers\.0\.self_attn\.k_proj", torch.int32), U, 3, "int32"),
    ("split/integer-router", _retype(r"layers\.1\.block_sparse_moe\.gate\.", torch.int64, "moe"), ["split-granularity", "{src}", "{out}", "-g", "2"], 3, "int64"),
    ("inspect/unsupported-dtype", _retype(r"embed_tokens", torch.uint16), ["inspect", "{src}"], 3, "unsupported dtype"),
    ("verify/index-names-a-tensor-its-shard-lacks", _sharded(_lie_missing_tensor), ["verify", "{src}", "{src}"], 3, "no shard holds"),
    ("profile/index-puts-a-tensor-in-the-wrong-shard", _sharded(_lie_wrong_shard, kind="moe"), ["profile", "{src}"], 3, "disagree"),
    ("profile/missing-expert", _moe(drop=r"layers\.1\.block_sparse_moe\.experts\.2\.w1"), ["profile", "{src}"], 3, "lacks"),
    ("balance/missing-attention", _moe("glm", drop=r"layers\.0\.self_attn\.q_proj"), ["balance", "{src}", "{out}"], 3, "q_proj"),
    ("verify/truncated-safetensors", _weights_bytes(lambda b: b[: len(b) - 1000]), ["verify", "{src}", "{src}"], 3, "truncated"),
    ("split/dense-missing-up_proj", _drop(r"layers\.1\.mlp\.up_proj"), ["split-granularity", "{src}", "{out}", "-g", "2"], 3, "up_proj"),
    # class 4: inconsistent or ill-typed configs and indexes: one line, exit 3
    ("upcycle/config-without-num_hidden_layers", lambda w: _dense_drop(w, "num_hidden_layers"), U, 3, "num_hidden_layers"),
    ("upcycle/layer-count-a-string", lambda w: _dense(w, num_hidden_layers="2"), U, 3, "num_hidden_layers"),
    ("upcycle/layer-count-a-bool", lambda w: _dense(w, num_hidden_layers=True), U, 3, "num_hidden_layers"),
    ("upcycle/layer-count-negative", lambda w: _dense(w, num_hidden_layers=-1), U, 3, "num_hidden_layers"),
    ("upcycle/more-layers-than-weights", lambda w: _dense(w, num_hidden_layers=3), U, 3, "layers.2"),
    ("upcycle/hidden-size-disagrees", lambda w: _dense(w, hidden_size=96), U, 3, "shape"),
    ("upcycle/heads-zero", lambda w: _dense(w, num_attention_heads=0), U, 3, "num_attention_heads"),
    ("upcycle/kv-heads-disagree", lambda w: _dense(w, num_key_value_heads=4), U, 3, "k_proj"),
    ("upcycle/vocab-a-float", lambda w: _dense(w, vocab_size=128.0), U, 3, "vocab_size"),
    ("upcycle/width-disagrees", lambda w: _dense(w, intermediate_size=100), U, 3, "shape"),
    ("split/top-k-a-string", _moe(num_experts_per_tok="2"), ["split-granularity", "{src}", "{out}", "-g", "2"], 3, "num_experts_per_tok"),
    ("upcycle/config-a-list", _config_text("[1, 2]"), U, 3, "JSON object"),
    ("upcycle/config-binary", _config_text(b"\xff\xfe\x00\x01garbage"), U, 3, "not valid JSON"),
    ("upcycle/config-empty", _config_text(""), U, 3, "not valid JSON"),
    ("upcycle/config-nested-too-deep", _config_text("[" * 200_000), U, 3, "not valid JSON"),
    ("inspect/config-binary", _config_text(b"\x00\x00\x00"), ["inspect", "{src}"], 3, "not valid JSON"),
    ("upcycle/index-without-weight_map", _index({"metadata": {}}), U, 3, "weight_map"),
    ("upcycle/index-weight_map-holds-numbers", _index({"weight_map": {"model.embed_tokens.weight": 1}}), U, 3, "weight_map"),
    ("convert/index-weight_map-a-list", _index({"weight_map": ["a", "b"]}), ["convert", "{src}", "{out}"], 3, "weight_map"),
    ("convert/index-points-outside-the-folder", _index({"weight_map": {"x": "../../etc/passwd"}}), ["convert", "{src}", "{out}"], 3, "not a file name"),
    ("convert/index-not-json", _index("{weight_map"), ["convert", "{src}", "{out}"], 3, "not valid JSON"),
    ("convert/index-names-a-missing-shard", _sharded(then=lambda s: (s / "model-00002-of-00002.safetensors").unlink()), ["convert", "{src}", "{out}"], 3, "missing"),
    # corrupt weights
    ("upcycle/truncated-safetensors", _weights_bytes(lambda b: b[: len(b) // 2]), U, 3, "truncated"),
    ("upcycle/garbage-safetensors", _weights_bytes(lambda b: os.urandom(4096)), U, 3, "not a readable safetensors"),
    ("convert/empty-safetensors", _weights_bytes(lambda b: b""), ["convert", "{src}", "{out}"], 3, "not a readable safetensors"),
    ("inspect/header-length-lies", _weights_bytes(_header_length_lies), ["inspect", "{src}"], 3, "not a readable safetensors"),
    ("convert/header-not-json", _weights_bytes(lambda b: (8).to_bytes(8, "little") + b"not json"), ["convert", "{src}", "{out}"], 3, "not a readable safetensors"),
    ("inspect/corrupt-gguf", lambda w: {"src": w.file("m.gguf", b"GGUF" + os.urandom(64))}, ["inspect", "{src}"], 3, "GGUF"),
    ("convert/corrupt-gguf", lambda w: {"src": w.file("m.gguf", b"GGUF\x03\x00\x00\x00" + b"\xff" * 32)}, ["convert", "{src}", "{out}"], 3, "GGUF"),
    # class 3: the pickle rule on every path
    ("upcycle/pickle-without-allow", _pickled("dense"), U, 3, "--allow-pickle"),
    ("inspect/pickle-without-allow", _pickled("dense"), ["inspect", "{src}"], 3, "--allow-pickle"),
    ("convert/pickle-without-allow", _pickled("dense"), ["convert", "{src}", "{out}"], 3, "--allow-pickle"),
    ("verify/pickle-without-allow", _pickled("dense"), ["verify", "{src}", "{src}"], 3, "--allow-pickle"),
    ("profile/pickle-without-allow", _pickled("moe"), ["profile", "{src}"], 3, "--allow-pickle"),
    ("split/pickle-without-allow", _pickled("moe"), ["split-granularity", "{src}", "{out}", "-g", "2"], 3, "--allow-pickle"),
    ("add-experts/pickle-without-allow", _pickled("moe"), ["add-experts", "{src}", "{out}", "-m", "1"], 3, "--allow-pickle"),
    ("balance/pickle-without-allow", _pickled("glm"), ["balance", "{src}", "{out}"], 3, "--allow-pickle"),
    ("train/pickle-without-allow", _pickled("moe"), ["train", "{src}", "{out}", "--data", "{src}/config.json", "--freeze", "none"], 3, "--allow-pickle"),
    ("convert/pickle-with-code-even-when-allowed", _evil_pickle, ["convert", "{src}", "{out}", "--allow-pickle"], 3, "never does that"),
    ("verify/pickle-with-code-even-when-allowed", _evil_pickle, ["verify", "{src}", "{src}", "--allow-pickle"], 3, "never does that"),
    # sources that are not there, or not what they seem
    ("upcycle/source-missing", lambda w: {"src": w.tmp / "nothing"}, U, 3, "no such file"),
    ("upcycle/source-a-plain-file", lambda w: {"src": w.file("notes.txt", "hello")}, U, 3, "expected a model folder"),
    ("upcycle/source-without-config", lambda w: {"src": _mkdir(w.tmp / "empty")}, U, 3, "config.json"),
    ("upcycle/source-a-symlink-loop", lambda w: {"src": _symlink_loop(w.tmp / "loop")}, U, 3, "loop"),
    ("inspect/config-a-symlink-loop", lambda w: _link_in(w, "config.json"), ["inspect", "{src}"], 3, "config.json"),
    ("convert/weights-a-symlink-loop", lambda w: _link_in(w, "model.safetensors"), ["convert", "{src}", "{out}"], 3, "model.safetensors"),
    ("inspect/source-a-device", lambda w: {"src": Path("/dev/null")}, ["inspect", "{src}"], 3, "/dev/null"),
    ("convert/weights-a-fifo", lambda w: _fifo_in(w, "model.safetensors"), ["convert", "{src}", "{out}"], 3, "model.safetensors"),
    ("upcycle/config-a-fifo", lambda w: _fifo_in(w, "config.json"), U, 3, "config.json"),
    ("upcycle/unicode-source-missing-k_proj", lambda w: _unicode_source(w), U, 3, "k_proj"),
    ("upcycle/weights-permission-denied", lambda w: _unreadable(w, "model.safetensors"), U, 3, "permission denied"),
    ("inspect/config-permission-denied", lambda w: _unreadable(w, "config.json"), ["inspect", "{src}"], 3, "permission denied"),
    # class 4 and 5: impossible options, one line (+ one hint for click's own usage errors)
    *[(f"{cmd}/no-arguments", _plain(), [cmd], 2, None) for cmd in COMMANDS],
    *[(f"{cmd}/unknown-option", _plain(), [cmd, "{src}", "--no-such-flag"], 2, "no-such-flag") for cmd in COMMANDS],
    ("upcycle/k-above-n", _plain(), ["upcycle", "{src}", "{out}", "-n", "2", "-k", "5"], 2, "--top-k"),
    ("upcycle/one-expert", _plain(), ["upcycle", "{src}", "{out}", "-n", "1"], 2, "--experts"),
    ("upcycle/experts-not-a-number", _plain(), ["upcycle", "{src}", "{out}", "-n", "eight"], 2, "--experts"),
    ("upcycle/moe-layers-every-0", _plain(), U + ["--moe-layers", "every:0"], 2, "every:0"),
    ("upcycle/moe-layers-every-negative", _plain(), U + ["--moe-layers", "every:-2"], 2, "every:-2"),
    ("upcycle/moe-layers-out-of-range", _plain(), U + ["--moe-layers", "0-99"], 2, "outside"),
    ("upcycle/moe-layers-gibberish", _plain(), U + ["--moe-layers", "some"], 2, "--moe-layers"),
    ("upcycle/max-shard-size-1e999GB", _plain(), U + ["--max-shard-size", "1e999GB"], 2, "1e999GB"),
    ("upcycle/max-shard-size-nan", _plain(), U + ["--max-shard-size", "nan"], 2, "nan"),
    ("upcycle/max-shard-size-negative", _plain(), U + ["--max-shard-size", "-5GB"], 2, "-5GB"),
    ("convert/max-shard-size-words", _plain(), ["convert", "{src}", "{out}", "--max-shard-size", "lots"], 2, "lots"),
    ("upcycle/dtype-int8", _plain(), U + ["--dtype", "int8"], 2, "int8"),
    ("convert/dtype-unknown", _plain(), ["convert", "{src}", "{out}", "--dtype", "fp7"], 2, "fp7"),
    ("upcycle/unknown-target", _plain(), U + ["--target", "nosuch"], 2, "nosuch"),
    ("upcycle/impossible-target", _plain(), U + ["--target", "deepseek_v3"], 2, "latent attention"),
    ("upcycle/noise-nan", _plain(), U + ["--noise", "nan"], 2, "noise"),
    ("upcycle/noise-inf", _plain(), U + ["--noise", "inf"], 2, "noise"),
    ("upcycle/drop-upcycling-above-1", _plain(), U + ["--drop-upcycling", "1.5"], 2, "--drop-upcycling"),
    ("upcycle/calibration-tokens-0", _plain(), U + ["--calibration-tokens", "0"], 2, "--calibration-tokens"),
    ("upcycle/router-init-unknown", _plain(), U + ["--router-init", "psychic"], 2, "--router-init"),
    ("upcycle/prompts-without-files", _plain(), U + ["--router-init", "prompts"], 2, "--prompts"),
    ("upcycle/shared-experts-mixtral", _plain(), U + ["--shared-experts", "2"], 2, "shared"),
    ("upcycle/expert-sources-wrong-count", _plain(), U + ["--expert-sources", "{src}"], 2, "--expert-sources"),
    ("upcycle/already-moe", _plain("moe"), U, 3, "already an MoE"),
    ("split/granularity-does-not-divide", _plain("moe"), ["split-granularity", "{src}", "{out}", "-g", "3"], 2, "divide"),
    ("split/granularity-1", _plain("moe"), ["split-granularity", "{src}", "{out}", "-g", "1"], 2, "granularity"),
    ("split/granularity-missing", _plain("moe"), ["split-granularity", "{src}", "{out}"], 2, "granularity"),
    ("split/partition-unknown", _plain("moe"), ["split-granularity", "{src}", "{out}", "-g", "2", "--partition", "alphabetical"], 2, "partition"),
    ("split/top-k-too-large", _plain("moe"), ["split-granularity", "{src}", "{out}", "-g", "2", "-k", "999"], 2, "--top-k"),
    ("add-experts/zero-new-experts", _plain("moe"), ["add-experts", "{src}", "{out}", "-m", "0"], 2, "--new-experts"),
    ("add-experts/copy-from-a-missing-expert", _plain("moe"), ["add-experts", "{src}", "{out}", "-m", "1", "--copy-from", "99"], 2, "99"),
    ("add-experts/init-unknown", _plain("moe"), ["add-experts", "{src}", "{out}", "-m", "1", "--init", "clone"], 2, "init"),
    ("add-experts/layers-subset", _plain("moe"), ["add-experts", "{src}", "{out}", "-m", "1", "--layers", "0-1"], 2, "--layers"),
    ("add-experts/drift-tokens-negative", _plain("moe"), ["add-experts", "{src}", "{out}", "-m", "1", "--drift-tokens", "-1"], 2, "--drift-tokens"),
    ("add-experts/profile-not-a-report", _with_file("p.json", '{"layers": 3}', "moe"), ["add-experts", "{src}", "{out}", "-m", "1", "--profile", "{file}"], 3, "profile --json"),
    ("add-experts/profile-missing", _plain("moe"), ["add-experts", "{src}", "{out}", "-m", "1", "--profile", "{src}/nothing.json"], 3, "nothing.json"),
    ("verify/dtype-int4", _plain(), ["verify", "{src}", "{src}", "--dtype", "int4"], 2, "int4"),
    ("verify/device-unknown", _plain(), ["verify", "{src}", "{src}", "--device", "abacus"], 3, "abacus"),
    ("verify/tolerance-nan", _plain(), ["verify", "{src}", "{src}", "--tolerance", "nan"], 2, "--tolerance"),
    ("balance/rate-nan", _plain("glm"), ["balance", "{src}", "{out}", "--rate", "nan"], 2, "--rate"),
    ("train/lr-inf", _plain("moe"), ["train", "{src}", "{out}", "--data", "{src}/config.json", "--lr", "inf"], 2, "--lr"),
    ("train/kd-weight-nan", _plain("moe"), ["train", "{src}", "{out}", "--data", "{src}/config.json", "--kd-weight", "nan"], 2, "--kd-weight"),
    ("verify/tokens-0", _plain(), ["verify", "{src}", "{src}", "--tokens", "0"], 2, "--tokens"),
    ("verify/child-missing", _plain(), ["verify", "{src}", "{src}/nothing"], 3, "no such file"),
    ("profile/capacity-factors-nan", _plain("moe"), ["profile", "{src}", "--capacity-factors", "nan"], 2, "capacity-factors"),
    ("profile/capacity-factors-words", _plain("moe"), ["profile", "{src}", "--capacity-factors", "1,x"], 2, "capacity-factors"),
    ("profile/capacity-factors-negative", _plain("moe"), ["profile", "{src}", "--capacity-factors", "-1"], 2, "capacity-factors"),
    ("profile/max-tokens-below-one-sequence", _plain("moe"), ["profile", "{src}", "--max-tokens", "4", "--seq-len", "8"], 2, "--max-tokens"),
    ("profile/dense-model", _plain(), ["profile", "{src}"], 3, None),
    ("balance/softmax-router", _plain("moe"), ["balance", "{src}", "{out}"], 3, None),
    ("train/gpu-index", _plain("moe"), ["train", "{src}", "{out}", "--data", "{src}/config.json", "--device", "cuda:1"], 2, "--device"),
    ("train/freeze-unknown", _plain("moe"), ["train", "{src}", "{out}", "--data", "{src}/config.json", "--freeze", "some"], 2, "--freeze"),
    ("train/data-missing", _plain("moe"), ["train", "{src}", "{out}", "--data", "{src}/nothing.txt", "--freeze", "none"], 3, "nothing.txt"),
    ("train/no-manifest", _plain("moe"), ["train", "{src}", "{out}", "--data", "{src}/config.json"], 3, None),
    # recipes
    ("upcycle/recipe-missing", _plain(), ["upcycle", "--recipe", "{src}/nothing.yaml"], 2, "does not exist"),
    ("upcycle/recipe-a-folder", _plain(), ["upcycle", "--recipe", "{src}"], 2, "folder"),
    ("upcycle/recipe-binary", _with_file("r.yaml", b"\x00\xff\xfe\x89PNG"), ["upcycle", "--recipe", "{file}"], 2, "UTF-8"),
    ("upcycle/recipe-latin-1", _with_file("r.yaml", "experts: 8 # caf\xe9".encode("latin-1")), ["upcycle", "--recipe", "{file}"], 2, "UTF-8"),
    ("upcycle/recipe-invalid-yaml", _with_file("r.yaml", "experts: [1, 2\ntop_k: 2\n"), ["upcycle", "--recipe", "{file}"], 2, "not valid YAML at line"),
    ("upcycle/recipe-a-list", _with_file("r.yaml", "- 1\n- 2\n"), ["upcycle", "--recipe", "{file}"], 2, "mapping"),
    ("upcycle/recipe-number-keys", _with_file("r.yaml", "1: 2\n"), ["upcycle", "--recipe", "{file}"], 2, "mapping"),
    ("upcycle/recipe-unknown-key", _with_file("r.yaml", "source: x\noutput: y\nexpert_count: 8\n"), ["upcycle", "--recipe", "{file}"], 2, "expert_count"),
    ("upcycle/recipe-wrong-type", _with_file("r.yaml", "source: x\noutput: y\nexperts: eight\n"), ["upcycle", "--recipe", "{file}"], 2, "experts"),
    ("upcycle/recipe-nan", _with_file("r.yaml", "source: x\noutput: y\nnoise: .nan\n"), ["upcycle", "--recipe", "{file}"], 2, "noise"),
    ("upcycle/recipe-empty", _with_file("r.yaml", ""), ["upcycle", "--recipe", "{file}"], 2, "source"),
    ("split/recipe-without-granularity", _with_file("r.yaml", "source: x\noutput: y\n"), ["split-granularity", "--recipe", "{file}"], 2, "granularity"),
    # outputs
    ("upcycle/output-exists", lambda w: {"src": w.copy("dense"), "out": _mkdir(w.tmp / "exists")}, U, 3, "already exists"),
    ("upcycle/output-inside-source", lambda w: {"src": (s := w.copy("dense")), "out": s / "moe"}, U, 2, "inside"),
    ("upcycle/output-is-a-file", lambda w: {"src": w.copy("dense"), "out": w.file("afile", "x")}, U + ["--overwrite"], 3, "not a folder"),
    ("convert/output-parent-is-a-file", lambda w: {"src": w.copy("dense"), "out": w.file("afile", "x") / "out"}, ["convert", "{src}", "{out}"], 3, "not a folder"),
    ("upcycle/output-not-utf8", lambda w: {"src": w.copy("dense"), "out": w.out_dir / os.fsdecode(b"out\xff")}, U, 2, "UTF-8"),
    ("convert/output-not-utf8", lambda w: {"src": w.copy("dense"), "out": w.out_dir / os.fsdecode(b"\xc3(")}, ["convert", "{src}", "{out}"], 2, "UTF-8"),
    ("upcycle/output-name-too-long", lambda w: {"src": w.copy("dense"), "out": w.out_dir / ("x" * 256)}, U, 2, "too long"),
    ("convert/output-path-too-long", lambda w: {"src": w.copy("dense"), "out": w.out_dir.joinpath(*["d" * 200] * 21)}, ["convert", "{src}", "{out}"], 2, "too long"),
    ("balance/output-exists", lambda w: {"src": w.copy("glm"), "out": _mkdir(w.tmp / "exists")}, ["balance", "{src}", "{out}"], 3, "already exists"),
    # data files
    ("verify/data-empty", _with_file("d.txt", ""), ["verify", "{src}", "{src}", "--data", "{file}"], 3, None),
    ("verify/data-binary", _with_file("d.txt", b"\xff\xfe\x00\x00" * 64), ["verify", "{src}", "{src}", "--data", "{file}"], 3, "UTF-8"),
    ("verify/data-a-folder", _plain(), ["verify", "{src}", "{src}", "--data", "{src}"], 3, None),
    ("verify/data-jsonl-broken-line", _with_file("d.jsonl", '{"text": "a"}\n{"text": '), ["verify", "{src}", "{src}", "--data", "{file}"], 3, "d.jsonl:2"),
    ("verify/data-without-tokenizer", lambda w: _no_tokenizer(w, "dense", data=True), ["verify", "{src}", "{src}", "--data", "{file}"], 3, "tokenizer"),
    ("profile/data-empty", _with_file("d.txt", "", "moe"), ["profile", "{src}", "--data", "{file}"], 3, None),
    ("profile/data-jsonl-without-text", _with_file("d.jsonl", '{"body": "a"}\n', "moe"), ["profile", "{src}", "--data", "{file}"], 3, "text"),
    ("balance/data-binary", _with_file("d.txt", b"\x00\x9f" * 100, "glm"), ["balance", "{src}", "{out}", "--data", "{file}"], 3, "UTF-8"),
    ("train/data-empty", lambda w: _manifest_model(w, data=""), ["train", "{src}", "{out}", "--data", "{file}", "--steps", "1"], 3, None),
    ("upcycle/kmeans-calibration-empty", _with_file("c.txt", ""), U + ["--router-init", "kmeans", "--calibration", "{file}"], 3, None),
    ("split/coactivation-calibration-binary", _with_file("c.txt", b"\xff" * 300, "moe"), ["split-granularity", "{src}", "{out}", "-g", "2", "--partition", "coactivation", "--calibration", "{file}"], 3, "UTF-8"),
    ("add-experts/calibration-jsonl-without-text", _with_file("c.jsonl", "[1, 2]\n", "moe"), ["add-experts", "{src}", "{out}", "-m", "1", "--calibration", "{file}"], 3, "text"),
    ("add-experts/calibration-permission-denied", lambda w: _unreadable_file(w, "moe"), ["add-experts", "{src}", "{out}", "-m", "1", "--calibration", "{file}"], 3, "permission denied"),
]


# --------------------------------------------------------------------------- every text flag × every format

OK_TEXT = "Plain English text for a tokenizer to read.\n\n" * 40
# flag -> (source kind, arguments that end with the flag; {ok} is a readable text file)
TEXT_FLAGS = {
    "upcycle--calibration": ("dense", U + ["--router-init", "kmeans", "--calibration"]),
    "upcycle--prompts": ("dense", U + ["--router-init", "prompts", "--prompts", "{ok}", "--prompts"]),
    "upcycle--negative-prompts": ("dense", U + ["--router-init", "prompts", "--prompts", "{ok}", "--prompts", "{ok}",
                                                "--negative-prompts"]),
    "split--calibration": ("moe", ["split-granularity", "{src}", "{out}", "-g", "2", "--partition", "coactivation",
                                   "--calibration"]),
    "add-experts--calibration": ("moe", ["add-experts", "{src}", "{out}", "-m", "1", "--calibration"]),
    "prune--calibration": ("moe", ["prune", "{src}", "{out}", "--ratio", "0.5", "--method", "reap", "--calibration"]),
    "profile--data": ("moe", ["profile", "{src}", "--seq-len", "16", "--data"]),
    "balance--data": ("glm", ["balance", "{src}", "{out}", "--seq-len", "16", "--data"]),
    "balance--eval-data": ("glm", ["balance", "{src}", "{out}", "--seq-len", "16", "--data", "{ok}", "--eval-data"]),
    "verify--data": ("dense", ["verify", "{src}", "{src}", "--data"]),
    "train--data": ("grown", ["train", "{src}", "{out}", "--steps", "1", "--seq-len", "16", "--data"]),
    "train--replay": ("grown", ["train", "{src}", "{out}", "--steps", "1", "--seq-len", "16", "--data", "{ok}",
                                "--replay"]),
    "train--eval-data": ("grown", ["train", "{src}", "{out}", "--steps", "1", "--seq-len", "16", "--data", "{ok}",
                                   "--eval-data"]),
}


def _parquet_without_text() -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"body": ["a"]}), sink)
    return sink.getvalue().to_pybytes()


# format -> (file name and content, what the one error line names)
BAD_TEXT = {
    "txt-binary": (("d.txt", b"\xff\xfe\x00\x00" * 64), "UTF-8"),
    "jsonl-broken-line": (("d.jsonl", '{"text": "a"}\n{"text": '), "d.jsonl:2"),
    "json-item-without-text": (("d.json", '[{"text": "a"}, {"body": "b"}]'), "d.json: item 2"),
    "parquet-without-text": (("d.parquet", _parquet_without_text), 'no "text" column'),
}


def _text_flag(kind: str, fmt: str):
    def setup(w: World):
        (name, content), _ = BAD_TEXT[fmt]
        src = _manifest_model(w, OK_TEXT)["src"] if kind == "grown" else w.copy(kind)
        bad = w.file(name, content() if callable(content) else content)
        return {"src": src, "ok": w.file("ok.txt", OK_TEXT), "bad": bad}
    return setup


CASES += [(f"{flag}/{fmt}", _text_flag(kind, fmt), [*args, "{bad}"], 3, match)
          for flag, (kind, args) in TEXT_FLAGS.items() for fmt, (_, match) in BAD_TEXT.items()]


def _dense_drop(w: World, key: str) -> dict:
    src = w.copy("dense")
    edit_config(src, drop=(key,))
    return {"src": src}


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _symlink_loop(path: Path) -> Path:
    path.symlink_to(path.name)
    return path


def _link_in(w: World, name: str) -> dict:
    src = w.copy("dense")
    (src / name).unlink()
    _symlink_loop(src / name)
    return {"src": src}


def _fifo_in(w: World, name: str) -> dict:
    """A named pipe where a file should be: opening it would wait forever for a writer."""
    src = w.copy("dense")
    (src / name).unlink()
    os.mkfifo(src / name)
    return {"src": src}


def _unicode_source(w: World) -> dict:
    src = w.copy("dense", as_name="модель-ü-日本")
    edit_tensors(src, keep=lambda n: "layers.1.self_attn.k_proj" not in n)
    return {"src": src}


def _deny(w: World, path: Path) -> None:
    """No read permission on `path`; as root (whom permissions do not stop), the same refusal is made
    by the open call moekit's readers go through."""
    if not ROOT_USER:
        os.chmod(path, 0)
        w.cleanup.append(lambda: os.chmod(path, 0o644))
        return
    from moekit.checkpoint import reader
    from moekit.data import text

    real_open = open

    def denying_open(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    for module in (reader, text):
        w.monkeypatch.setattr(module, "open", denying_open, raising=False)


def _unreadable(w: World, name: str) -> dict:
    src = w.copy("dense")
    _deny(w, src / name)
    return {"src": src}


def _unreadable_file(w: World, kind: str) -> dict:
    src, f = w.copy(kind), w.file("c.txt", "some calibration text\n\nmore of it")
    _deny(w, f)
    return {"src": src, "file": f}


def _no_tokenizer(w: World, kind: str, data: bool = False) -> dict:
    src = w.copy(kind)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (src / f).unlink()
    return {"src": src, **({"file": w.file("d.txt", "some text " * 50)} if data else {})}


def _manifest_model(w: World, data: str) -> dict:
    """An add-experts output (it carries the freeze manifest train applies) and a data file."""
    grown = w.tmp / "grown"
    run_moekit("add-experts", str(w.models["moe"]), str(grown), "-m", "1", "--init", "mean", "--drift-tokens", "0",
               check=True)
    w.inputs.append(grown)
    return {"src": grown, "file": w.file("d.txt", data)}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, case):
    _, setup, args, code, match = case
    places = {"out": world.out, **setup(world)}
    run_case(world, [a.format(**places) for a in args], code, match)
    assert not Path("/tmp/moekit-pickle-ran").exists()  # the code-holding pickle's command


def test_cases_cover_every_command_and_are_many():
    commands = {c[2][0] for c in CASES}
    assert commands == set(COMMANDS)
    assert len(CASES) + len(REMOTE_CODE) + len(SIGNALS) >= 100


# --------------------------------------------------------------------------- disks: full, read-only


def _can_mount() -> bool:
    return ROOT_USER and shutil.which("mount") is not None and sys.platform.startswith("linux")


@pytest.fixture
def small_disk(tmp_path):
    """A 300 kB tmpfs (a real ENOSPC) where this process may mount one; else None."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if not _can_mount() or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)],
                                          capture_output=True).returncode:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_full_disk_midway_is_exit_4_and_names_the_output(world, small_disk, monkeypatch):
    src = world.copy("dense")
    if small_disk is None:  # no mount here: the writer's own calls fail as a full disk does
        from moekit.checkpoint import writer

        def full(*args):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(writer, "_write_all", full)
        monkeypatch.setattr(writer, "_copy_range", full)
        out_dir = world.out_dir
    else:  # a disk that says it has room, then fills up midway (as when something else writes to it)
        from moekit.checkpoint import writer

        monkeypatch.setattr(writer.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 0, 10**9))
        out_dir = small_disk
    world.tmp.joinpath("o").rmdir()
    world.out_dir.symlink_to(out_dir) if small_disk is not None else world.out_dir.mkdir()
    proc = run_case(world, ["upcycle", src, world.out_dir / "moe", "-n", "8", "-k", "2"], 4, "disk full")
    assert "moe" in proc.stderr.splitlines()[0] and TEMP_MARKER not in proc.stderr


def test_a_failed_write_removes_the_folders_it_made(world, monkeypatch):
    """OUTPUT in folders that did not exist: a failure midway leaves none of them."""
    from moekit.checkpoint import writer

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_copy_range", full)
    run_case(world, ["convert", world.copy("dense"), world.out_dir / "new" / "deeper" / "model"], 4, "disk full")


def test_too_small_a_disk_is_refused_before_writing(world, small_disk):
    if small_disk is None:
        pytest.skip("no tmpfs can be mounted here")
    src = world.copy("dense")
    world.tmp.joinpath("o").rmdir()
    world.out_dir.symlink_to(small_disk)
    proc = run_case(world, ["upcycle", src, world.out_dir / "moe", "-n", "8", "-k", "2"], 4, "nothing was written")
    assert "GB free" in proc.stderr


def test_full_disk_in_side_files_names_the_output_not_the_source(world, monkeypatch):
    from moekit.checkpoint import reader

    src = world.copy("dense")
    real_copy = shutil.copy2

    def full_on_tokenizer(a, b, *args, **kw):
        if Path(a).name == "tokenizer.json":  # as the kernel reports it: the error names the file read from
            raise OSError(errno.ENOSPC, "No space left on device", str(a))
        return real_copy(a, b, *args, **kw)

    monkeypatch.setattr(reader.shutil, "copy2", full_on_tokenizer)
    proc = run_case(world, ["convert", src, world.out], 4, "disk full")
    line = proc.stderr.splitlines()[0]
    assert str(world.out) in line and str(src) not in line


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody may write into: a read-only tmpfs as root, a 0o555 folder otherwise."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if not ROOT_USER:
        ro.chmod(0o555)
        yield ro
        ro.chmod(0o755)
        return
    if not _can_mount() or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)],
                                          capture_output=True).returncode:
        pytest.skip("root, and no read-only mount possible here: permissions do not stop root")
    try:
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


@pytest.mark.parametrize("cmd", ["convert", "upcycle"])
def test_read_only_target_is_exit_4(world, read_only_dir, cmd):
    src = world.copy("dense")
    args = [cmd, src, read_only_dir / "out"] + (["-n", "2", "-k", "1"] if cmd == "upcycle" else [])
    proc = run_case(world, args, 4, None)
    assert "out" in proc.stderr and TEMP_MARKER not in proc.stderr
    assert list(read_only_dir.iterdir()) == []


# --------------------------------------------------------------------------- what must work


def test_a_250_byte_output_name_works(world):
    src = world.copy("dense")
    out = world.out_dir / ("ü" * 125)  # 250 bytes of UTF-8
    run_case(world, ["convert", src, out], 0, None)
    assert (out / "config.json").is_file() and sorted(p.name for p in world.out_dir.iterdir()) == [out.name]


def test_plain_add_experts_counts_on_the_builtin_sample(world):
    """`add-experts SRC OUT -m 2` and nothing else: most-used is counted on the built-in sample."""
    src = world.copy("moe")
    proc = run_case(world, ["add-experts", src, world.out, "-m", "2", "--drift-tokens", "0"], 0, None)
    assert "built-in" in proc.stderr and (world.out / "moekit.json").is_file()
    layers = json.loads((world.out / "moekit.json").read_text())["layers"]
    assert all(len(layer["copied_from"]) == 2 for layer in layers)


@pytest.mark.parametrize("cmd", [["add-experts", "-m", "1", "--drift-tokens", "256"],
                                 ["split-granularity", "-g", "2", "--partition", "coactivation", "--calibration-tokens", "1024"]])
def test_allow_pickle_reaches_every_load_of_the_command(world, cmd):
    """--allow-pickle holds for the forward passes too (drift, calibration), not only the surgery."""
    src = world.copy("moe")
    to_pickle(src)
    run_case(world, [cmd[0], src, world.out, *cmd[1:], "--allow-pickle"], 0, None)
    assert (world.out / "model.safetensors").is_file()


def test_plain_balance_uses_the_builtin_sample(world):
    src = world.copy("glm")
    run_case(world, ["balance", src, world.out, "--steps", "3", "--max-tokens", "2048", "--seq-len", "64"], 0, None)
    assert json.loads((world.out / "moekit.json").read_text())["options"]["data"] == "built-in sample"


def test_every_transformers_load_refuses_remote_code():
    """Every from_pretrained / from_config call in the package says trust_remote_code=False."""
    import ast

    calls = []
    for f in (Path(__file__).parent.parent / "moekit").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr in ("from_pretrained", "from_config"):
                says = {k.arg: k.value for k in node.keywords}
                ok = isinstance(says.get("trust_remote_code"), ast.Constant) and says["trust_remote_code"].value is False
                calls.append((f"{f.name}:{node.lineno}", ok))
    assert len(calls) >= 4, calls
    assert all(ok for _, ok in calls), [where for where, ok in calls if not ok]


# --------------------------------------------------------------------------- remote code (subprocess, "y" on stdin)

# (id, args, exit code): SRC is a folder whose custom code would write the marker; KNOWN is one of a
# type transformers ships (its custom files are ignored), UNKNOWN one only its own code defines.
# A known type loads with transformers' own classes and the tokenizer from tokenizer.json: the command works.
SMALL = ["--calibration-tokens", "1024"]
RUN_SMALL = ["--max-tokens", "1024", "--seq-len", "64"]
REMOTE_CODE = [
    ("verify", ["verify", "{known}", "{known}", "--tokens", "256"], 0),
    ("verify-unknown-type", ["verify", "{unknown}", "{unknown}"], 3),
    ("verify--data", ["verify", "{known}", "{known}", "--data", "{text}", "--tokens", "256"], 0),
    ("upcycle--router-init-kmeans", ["upcycle", "{known}", "{out}", "-n", "2", "-k", "1", "--router-init", "kmeans", *SMALL], 0),
    ("split--partition-coactivation", ["split-granularity", "{known_moe}", "{out}", "-g", "2", "--partition", "coactivation", *SMALL], 0),
    ("split-unknown-type", ["split-granularity", "{unknown_moe}", "{out}", "-g", "2", "--partition", "coactivation"], 3),
    ("add-experts-data-driven", ["add-experts", "{known_moe}", "{out}", "-m", "1", "--router-init", "kmeans", "--drift-tokens", "256", *SMALL], 0),
    ("profile", ["profile", "{known_moe}", *RUN_SMALL], 0),
    ("balance", ["balance", "{known_glm}", "{out}", "--steps", "2", *RUN_SMALL], 0),
    ("train", ["train", "{known_moe}", "{out}", "--data", "{text}", "--freeze", "none", "--steps", "1", "--seq-len", "64", "--batch-size", "2"], 0),
    ("train-unknown-type", ["train", "{unknown_moe}", "{out}", "--data", "{text}", "--freeze", "none", "--steps", "1"], 3),
    ("inspect", ["inspect", "{unknown}"], 0),
    ("convert", ["convert", "{unknown}", "{out}"], 0),
]

_DRIVER = textwrap.dedent("""
    import contextlib, io, json, sys
    from moekit.cli import app
    results = {}
    for name, args, marker in json.load(open(sys.argv[1])):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                app(args, prog_name="moekit")
                code = 0
            except SystemExit as e:
                code = e.code or 0
        import os
        results[name] = {"code": code, "stderr": err.getvalue(), "ran": os.path.exists(marker)}
    json.dump(results, open(sys.argv[2], "w"))
""")


@pytest.fixture(scope="session")
def remote_code_runs(models, tmp_path_factory):
    """Every remote-code case in one subprocess (one import of torch and transformers), its stdin
    a pipe full of "y": what a user who answers yes to every prompt gives."""
    root = tmp_path_factory.mktemp("remote-code")
    marker = root / "MARKER"
    folders = {"known": remote_code_folder(models["dense"], root / "known", marker),
               "unknown": remote_code_folder(models["dense"], root / "unknown", marker, known_type=False),
               "known_moe": remote_code_folder(models["moe"], root / "known_moe", marker),
               "unknown_moe": remote_code_folder(models["moe"], root / "unknown_moe", marker, known_type=False),
               "known_glm": remote_code_folder(models["glm"], root / "known_glm", marker)}
    (root / "text.txt").write_text("Plain English text for a tokenizer to read. " * 200)
    hashes = {k: tree_hash(v) for k, v in folders.items()}
    plan = []
    for name, args, _ in REMOTE_CODE:
        places = {**folders, "text": root / "text.txt", "out": root / "out" / name}
        plan.append((name, [a.format(**places) for a in args], str(marker)))
    (root / "out").mkdir()
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "driver.py").write_text(_DRIVER)
    proc = subprocess.run([sys.executable, str(root / "driver.py"), str(root / "plan.json"), str(root / "results.json")],
                          input="y\n" * 1000, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((root / "results.json").read_text())
    return results, marker, {k: tree_hash(v) for k, v in folders.items()} == hashes, root / "out"


@pytest.mark.parametrize("case", REMOTE_CODE, ids=[c[0] for c in REMOTE_CODE])
def test_no_remote_code_on_any_path(remote_code_runs, case):
    results, marker, inputs_unchanged, out_root = remote_code_runs
    name, _, code = case
    r = results[name]
    assert not r["ran"] and not marker.exists(), f"{name}: the folder's own code ran"
    assert inputs_unchanged
    proc = subprocess.CompletedProcess([], r["code"], stdout="", stderr=r["stderr"])
    assert_clean_failure(proc, code, None)
    if code:
        assert not (out_root / name).exists()


# --------------------------------------------------------------------------- signals midway (subprocess)

SLOW_CLI = """
import sys, time
from moekit.checkpoint.writer import CheckpointWriter
begin = CheckpointWriter._begin  # every tensor starts here: make each slow, so a signal lands midway
CheckpointWriter._begin = lambda self, name: (time.sleep(0.2), begin(self, name))[1]
sys.argv = ["moekit"] + sys.argv[1:]
from moekit.cli import main
main()
"""

SIGNALS = ["SIGINT", "SIGTERM", "SIGKILL"]


def _start_midway(args: list[str], parent: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CLI, *args], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    deadline = time.time() + 120
    while not any(TEMP_MARKER in p.name for p in parent.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.6)  # some tensors are written by now
    return proc


@pytest.mark.parametrize("sig", SIGNALS)
def test_signal_midway(world, sig):
    src = world.copy("dense")
    before = tree_hash(src)
    proc = _start_midway(["upcycle", str(src), str(world.out), "-n", "4", "-k", "2"], world.out_dir)
    proc.send_signal(getattr(signal, sig))
    stderr = proc.communicate(timeout=60)[1]
    assert tree_hash(src) == before
    assert not world.out.exists()
    if sig != "SIGKILL":
        assert_clean_failure(subprocess.CompletedProcess([], proc.returncode, "", stderr), 130, "interrupted")
        assert list(world.out_dir.iterdir()) == []
        return
    # Killed outright: its hidden partial folder stays, and the next run into the folder sweeps it.
    left = [p.name for p in world.out_dir.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out" + TEMP_MARKER), left
    again = run_moekit("convert", str(src), str(world.out_dir / "other"))
    assert again.returncode == 0, again.stderr
    swept = [line for line in again.stderr.splitlines() if "killed runs" in line]
    assert len(swept) == 1 and left[0] in swept[0]
    assert sorted(p.name for p in world.out_dir.iterdir()) == ["other"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("swap_done", [False, True])
def test_an_overwrite_killed_between_its_renames_loses_no_model(world, swap_done):
    """--overwrite moves the old output aside, then the new one in. Killed in between, the next run
    puts the old one back; killed after, it removes the old one."""
    src = world.copy("dense")
    pid = _dead_pid()
    old = world.out_dir / f".model.moekit-old-{pid}"
    old.mkdir()
    (old / "config.json").write_text("{}")
    if swap_done:
        (world.out_dir / "model").mkdir()
    proc = run_moekit("convert", str(src), str(world.out_dir / "other"))
    assert proc.returncode == 0, proc.stderr
    assert not old.exists()
    assert (world.out_dir / "model" / "config.json").is_file() != swap_done
    line = [x for x in proc.stderr.splitlines() if "killed runs" in x]
    assert len(line) == 1 and ("removed" if swap_done else "restored model") in line[0]


def test_a_live_runs_partial_folder_is_not_swept(world):
    """A partial folder whose process still runs is left alone (another run may be writing it)."""
    src = world.copy("dense")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = world.out_dir / f".busy{TEMP_MARKER}{sleeper.pid}"
        busy.mkdir()
        run_moekit("convert", str(src), str(world.out_dir / "x"), check=True)
        assert busy.is_dir()
    finally:
        sleeper.kill()
        sleeper.wait()
