"""Loading models and tokenizers through transformers, for the commands that run forward passes
(verify, data-driven router init). Surgery itself never imports transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moekit.checkpoint import Checkpoint
from moekit.checkpoint.reader import TOKENIZER_FILES, SafetensorsCheckpoint, open_checkpoint
from moekit.checkpoint.sources import resolve_source
from moekit.errors import MoekitError, one_line
from moekit.runtime.transformers_private import no_init_weights
from moekit.surgery.requirements import check_complete

# Config keys that `AutoConfig.for_model` must not see: the type is its positional argument,
# `auto_map` would point at remote code, `quantization_config` makes transformers expect
# quantised weights, and the dtype is ours to choose (fp32).
_DROPPED_CONFIG_KEYS = ("model_type", "auto_map", "quantization_config", "torch_dtype", "dtype")


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` -> cuda when available, else cpu; a clear error for a device that is not there."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MoekitError(f"unknown device {str(name)!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MoekitError(f"device {str(name)!r} requested, but torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MoekitError(f"device {str(name)!r} requested, but torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def custom_code(folder: Path, file: str) -> str | None:
    """What `file`'s `auto_map` points at, if it names custom code (None for no auto_map)."""
    try:
        data = json.loads((folder / file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # missing or unreadable: the loader itself reports that
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    if not auto_map:
        return None
    refs = auto_map.values() if isinstance(auto_map, dict) else [auto_map]
    names = [next((x for x in r if x), None) if isinstance(r, list) else r for r in refs]  # [slow, fast] pairs
    return ", ".join(sorted({str(n).split("--")[-1].split(".")[0] + ".py" for n in names if n})) or "auto_map"


def refuse_custom_model_code(folder: Path) -> None:
    """A model folder whose architecture only its own Python code defines is refused: moekit never
    runs code from a checkpoint. One that maps a type transformers ships is read with
    transformers' own classes (`trust_remote_code=False`), its custom files ignored."""
    from transformers import CONFIG_MAPPING

    code = custom_code(folder, "config.json")
    if code is None:
        return
    model_type = _config_value(folder, "model_type")
    if model_type not in CONFIG_MAPPING:
        raise MoekitError(f"{folder}: its architecture {model_type!r} needs the folder's own code ({code}, named by "
                          "auto_map in config.json); moekit never runs code from a checkpoint")


def _config_value(folder: Path, key: str):
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get(key) if isinstance(data, dict) else None


def _from_pretrained(cls, source: str | Path, what: str, allow_pickle: bool = False, complete: bool = False, **kw):
    """`cls.from_pretrained` on a folder or a .gguf file, never with remote code and never reading a
    pickle unless allowed; any failure becomes one line."""
    path = resolve_source(source)
    if path.suffix == ".gguf":
        where, kw = path.parent, {**kw, "gguf_file": path.name}
    elif (path / "config.json").is_file():
        where = path
        refuse_custom_model_code(path)
        # moekit's reader first: the pickle rule (a pickle is read weights-only, and its refusal is the
        # clear one), an index that disagrees with its shards, corrupt headers
        ckpt = open_checkpoint(path, allow_pickle=allow_pickle)
        ckpt.tensors
        if complete:
            check_complete(ckpt)
        kw["use_safetensors"] = isinstance(ckpt, SafetensorsCheckpoint)
    else:
        raise MoekitError(f"{path}: not a model folder (no config.json) nor a .gguf file")
    try:
        return cls.from_pretrained(where, trust_remote_code=False, **kw)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError/... for unloadable input
        if "Weights only load failed" in str(e):  # not torch's advice, which is to run the pickle's code
            raise MoekitError(f"{path}: its pickle holds objects other than tensors, which only unpickling with "
                              "code execution could read; moekit never does that") from None
        raise MoekitError(f"{path}: transformers cannot load its {what}: {one_line(e)[:300]}") from None


def load_model(source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "auto",
               device_map: str | None = None, allow_pickle: bool = False,
               complete: bool = False) -> tuple[torch.nn.Module, list[str]]:
    """The model in eval mode on `device` (or spread by accelerate's `device_map`, e.g. "auto"
    for a model larger than one GPU), and warnings about weights the checkpoint lacked
    (transformers initialises those randomly, so the comparison would measure noise).
    `complete`: a checkpoint that lacks weights is refused instead (profile and balance would
    measure, and balance write, a partly random model)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    device = resolve_device(device)
    hf_logging.set_verbosity_error()  # moekit reports what matters itself, one line each
    hf_logging.disable_progress_bar()
    placement = {"device_map": device_map} if device_map else {}
    model, info = _from_pretrained(AutoModelForCausalLM, source, "model", allow_pickle, complete, dtype=dtype,
                                   output_loading_info=True, **placement)
    warnings = []
    for kind, consequence in (("missing_keys", "missing from the checkpoint, randomly initialised"),
                              ("unexpected_keys", "in the checkpoint but not used by the model")):
        keys = sorted(info.get(kind) or ())
        if keys and complete and kind == "missing_keys":
            raise MoekitError(f"{source}: the checkpoint lacks {len(keys)} weight(s) the model needs, e.g. {keys[0]}")
        if keys:
            warnings.append(f"{source}: {len(keys)} weight(s) {consequence}: {', '.join(keys[:3])}"
                            + (", ..." if len(keys) > 3 else ""))
    return (model if device_map else model.to(device)).eval(), warnings


def load_tokenizer(source: str | Path):
    """The source's own tokenizer: from the folder's files, or rebuilt from a GGUF's metadata."""
    from transformers import AutoTokenizer

    path = resolve_source(source)
    try:
        if path.is_file():  # GGUF carries its vocabulary inside
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        refuse_custom_model_code(path)  # a folder that needs its own code is refused before any text is read
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise MoekitError(
                f"{path}: no tokenizer ({', '.join(TOKENIZER_FILES)}); text input needs one; "
                "copy the tokenizer files into the folder"
            )
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except MoekitError:
        raise
    except Exception as e:  # tokenizers raise many types for a broken file
        code = custom_code(path, "tokenizer_config.json") if path.is_dir() else None
        if code and (path / "tokenizer.json").is_file():
            return _plain_tokenizer(path)
        if code:
            raise MoekitError(f"{path}: its tokenizer needs the folder's own code ({code}, named by auto_map in "
                              "tokenizer_config.json); moekit never runs code from a checkpoint") from None
        raise MoekitError(f"{path}: cannot load its tokenizer: {one_line(e)[:300]}") from None


def _plain_tokenizer(folder: Path):
    """The folder's tokenizer.json (plain data) with the special tokens its tokenizer_config names,
    for a folder whose tokenizer class is custom code that moekit does not run."""
    from transformers import PreTrainedTokenizerFast

    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            special[key] = value
    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **special)
    except Exception as e:  # tokenizers raises its own types for a broken file
        raise MoekitError(f"{folder}: cannot load its tokenizer.json: {one_line(e)[:300]}") from None


def load_dense_model(ckpt: Checkpoint, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The checkpoint as an fp32 transformers causal LM on `device`, in eval mode.

    Built from the config, then filled one tensor at a time from `ckpt.load`, so the same code
    serves safetensors folders and GGUF files (whose tensors `from_pretrained` cannot stream).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {k: v for k, v in ckpt.config.items() if k not in _DROPPED_CONFIG_KEYS}
    model_type = ckpt.config.get("model_type")
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (KeyError, ValueError) as e:
        raise MoekitError(f"{ckpt.path}: transformers cannot build a {model_type!r} model: {e}") from None
    # Allocate straight on the device and skip random init: every weight is overwritten below,
    # and initialising a multi-billion-parameter model on a CPU alone takes minutes.
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    model.float()

    state = model.state_dict()
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = []
    with torch.no_grad():
        for name, target in state.items():
            if name not in ckpt.tensors:
                if not (tied and name == "lm_head.weight"):
                    missing.append(name)
                continue
            loaded = ckpt.load(name, torch.float32)
            if tuple(loaded.shape) != tuple(target.shape):
                raise MoekitError(f"{ckpt.path}: {name} has shape {tuple(loaded.shape)}, the config implies {tuple(target.shape)}")
            target.copy_(loaded)
    if missing:
        raise MoekitError(f"{ckpt.path}: the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]}")
    if tied:
        model.tie_weights()  # lm_head was left uninitialised; make it the embedding again
    return model.eval()


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) under `accelerate launch` or `torchrun` (they set WORLD_SIZE and the
    rendezvous variables); the process group is initialised on first use. (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank(), world


def run_settings(device: str, dtype: str):
    """Validated device and dtype (before any loading); under `accelerate launch` / `torchrun`
    each process takes its own GPU."""
    from moekit.checkpoint.dtypes import parse_dtype

    where = resolve_device(device)
    if where.type == "cuda" and distributed_rank()[1] > 1:
        where = resolve_device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        torch.cuda.set_device(where)
    if dtype == "auto":
        return where, torch.bfloat16 if where.type == "cuda" else torch.float32
    return where, parse_dtype(dtype)
