"""Streaming checkpoint readers.

Every reader gives the config as a plain dict, the tensor headers (name, shape, dtype) without
reading any weights, and one tensor at a time on request. Surgery never holds a whole model.
"""

from __future__ import annotations

import errno
import json
import shutil
import struct
from abc import ABC
from functools import cached_property
from pathlib import Path

import torch

from moekit.checkpoint.base import Checkpoint, TensorMeta, cast
from moekit.checkpoint.dtypes import SAFETENSORS_DTYPES
from moekit.errors import MoekitError, one_line

DISK_FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)

# Files a model folder carries besides weights and config, copied to every output unchanged.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


class FolderCheckpoint(Checkpoint, ABC):
    """A Hugging Face model folder: config.json plus weights and side files."""

    @cached_property
    def config(self) -> dict:
        return _read_json(self.path / "config.json")

    def write_side_files(self, dest: Path) -> list[str]:
        copied = []
        for name in SIDE_FILES:
            if (self.path / name).is_file():
                try:
                    shutil.copy2(self.path / name, dest / name)
                except OSError as e:
                    if e.errno in DISK_FULL_OR_READ_ONLY:  # the output's disk, not the source's file
                        e.filename = str(dest / name)
                    raise
                copied.append(name)
        return copied


class SafetensorsCheckpoint(FolderCheckpoint):
    """`model.safetensors`, or shards listed in `model.safetensors.index.json`.

    The safetensors library validates each file's header; the data is then read with plain
    `readinto` into a fresh tensor rather than through a memory map, so the resident memory of
    a surgery is one tensor, not every page of the source it has touched.
    """

    def __init__(self, path: Path):
        super().__init__(path)
        self._where: dict[str, tuple[Path, int, int]] = {}  # name -> (file, start byte, end byte)

    @cached_property
    def weight_map(self) -> dict[str, str] | None:
        """The index's tensor name -> shard file name (None for one model.safetensors), checked."""
        index = self.path / "model.safetensors.index.json"
        if not index.is_file():
            return None
        return read_weight_map(index)

    def weight_files(self) -> list[Path]:
        if self.weight_map is None:
            return [self.path / "model.safetensors"]
        files = sorted({self.path / f for f in self.weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MoekitError(f"{self.path}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return files

    @cached_property
    def tensors(self) -> dict[str, TensorMeta]:
        metas = {}
        for file in self.weight_files():
            header, data_start = _safetensors_header(file)
            for name, info in header.items():
                if name in metas:
                    raise MoekitError(f"{file}: tensor {name} is held by two shards; the checkpoint is inconsistent")
                if self.weight_map is not None and self.weight_map.get(name) != file.name:
                    raise MoekitError(f"{file}: holds tensor {name}, which the index "
                                      + (f"puts in {self.weight_map[name]}" if name in self.weight_map else "does not list")
                                      + "; the index and the shards disagree")
                dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise MoekitError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
                metas[name] = TensorMeta(name, tuple(info["shape"]), dtype)
                begin, end = info["data_offsets"]
                self._where[name] = (file, data_start + begin, data_start + end)
        lost = sorted(set(self.weight_map or ()) - set(metas))
        if lost:
            raise MoekitError(f"{self.path}: the index lists {len(lost)} tensor(s) no shard holds, e.g. {lost[0]} "
                              f"(said to be in {self.weight_map[lost[0]]}); the index and the shards disagree")
        return metas

    def byte_range(self, name: str) -> tuple[Path, int, int]:
        self.meta(name)
        return self._where[name]

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        meta = self.meta(name)
        file, start, end = self._where[name]
        out = torch.empty(meta.shape, dtype=meta.dtype)
        buf = out.view(-1).view(torch.uint8).numpy() if meta.numel else bytearray()
        with _open_input(file) as f:
            f.seek(start)
            if f.readinto(buf) != end - start:
                raise MoekitError(f"{file}: ends inside tensor {name}; the file is truncated")
        return cast(out, dtype)


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """Validate a safetensors file with the safetensors library; return its header and data offset."""
    from safetensors import SafetensorError, safe_open

    _open_input(file).close()  # an unreadable file is named as such, not as missing or corrupt
    try:
        with safe_open(str(file), framework="pt"):
            pass
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (SafetensorError, OSError, ValueError, struct.error) as e:
        raise MoekitError(f"{file}: not a readable safetensors file (corrupt or truncated?): {one_line(e)}") from None
    if not isinstance(header, dict):
        raise MoekitError(f"{file}: not a readable safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    return header, 8 + length


def _open_input(file: Path):
    """`open(file, "rb")`, failing as bad input (exit 3) with the reason: permission denied, ..."""
    try:
        return open(file, "rb")
    except OSError as e:
        raise MoekitError(f"{file}: cannot read it: {(e.strerror or str(e)).lower()}") from None


def read_weight_map(index: Path) -> dict[str, str]:
    """An index file's weight_map, refused unless it maps tensor names to shard files in the folder."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise MoekitError(f"{index}: no weight_map (tensor name -> shard file); the index file is damaged")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file or Path(file).name != file:
            raise MoekitError(f"{index}: weight_map gives {name!r} the shard {file!r}, not a file name in the folder")
    return weight_map


class PickleCheckpoint(FolderCheckpoint):
    """`pytorch_model.bin` (or its shards), read only with `torch.load(weights_only=True)`.

    Pickle files cannot be read tensor by tensor; each shard is memory-mapped instead.
    """

    def weight_files(self) -> list[Path]:
        index = self.path / "pytorch_model.bin.index.json"
        if index.is_file():
            return sorted({self.path / f for f in read_weight_map(index).values()})
        return [self.path / "pytorch_model.bin"]

    @cached_property
    def _state(self) -> dict[str, torch.Tensor]:
        state = {}
        for file in self.weight_files():
            _open_input(file).close()
            try:
                try:
                    state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
                except RuntimeError as e:  # the legacy (pre-zip) format cannot be memory-mapped
                    if "mmap" not in str(e):
                        raise
                    state.update(torch.load(file, map_location="cpu", weights_only=True))
            except Exception as e:  # torch raises many types for a bad pickle
                # torch's own advice (weights_only=False "will likely succeed") would run the pickle's code
                unsafe = "Weights only load failed" in str(e)
                raise MoekitError(f"{file}: " + ("cannot read it with weights_only=True: it holds objects other "
                                  "than tensors, which only unpickling with code execution could read; moekit never "
                                  "does that" if unsafe else f"not a readable pickle checkpoint ({one_line(e)[:200]})")) from None
        return state

    @cached_property
    def tensors(self) -> dict[str, TensorMeta]:
        return {n: TensorMeta(n, tuple(t.shape), t.dtype) for n, t in self._state.items()}

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        self.meta(name)
        return cast(self._state[name].clone(), dtype)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MoekitError(f"{path.parent}: no {path.name}; is this a Hugging Face model folder?")
    with _open_input(path) as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise MoekitError(f"{path}: not valid JSON ({one_line(e)[:200]})") from None
    if not isinstance(data, dict):
        raise MoekitError(f"{path}: expected a JSON object")
    return data


def open_checkpoint(source: str | Path, *, allow_pickle: bool = False, dtype: torch.dtype | None = None) -> Checkpoint:
    """Open a model folder, a `.gguf` file, or a built-in name such as `smollm2-135m`.

    `dtype` only matters for GGUF, whose quantised blocks are dequantised to it (float32 by default).
    """
    from moekit.checkpoint.sources import resolve_source

    path = resolve_source(source)
    if path.is_file() and path.suffix == ".gguf":
        from moekit.checkpoint.gguf import GGUFCheckpoint

        return GGUFCheckpoint(path, dtype=dtype or torch.float32)
    if path.is_file():
        raise MoekitError(f"{path}: expected a model folder or a .gguf file")
    if not (path / "config.json").is_file():
        raise MoekitError(f"{path}: no config.json; is this a Hugging Face model folder?")
    return SafetensorsCheckpoint(path) if weights_are_safetensors(path, allow_pickle) else PickleCheckpoint(path)


def weights_are_safetensors(folder: Path, allow_pickle: bool) -> bool:
    """True for safetensors weights, False for pickle ones (only when allowed); else one clear error."""
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return True
    if (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        if not allow_pickle:
            raise MoekitError(
                f"{folder}: weights are a pickle (pytorch_model.bin), which can run code when loaded; "
                "pass --allow-pickle to read it with torch.load(weights_only=True), or convert it once with "
                "`moekit convert --allow-pickle`"
            )
        return False
    raise MoekitError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
