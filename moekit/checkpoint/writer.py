"""Streaming, atomic checkpoint writer.

The writer is told the whole output plan (names, shapes, dtypes) before any data comes, so each
safetensors shard's header is written first and tensors are streamed straight after it: memory
stays at one tensor whatever the model size. Everything goes into a hidden temporary folder beside
the target, renamed into place only when complete, so an interrupted run never leaves a folder
that looks like a finished model.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from moekit.checkpoint.dtypes import SAFETENSORS_NAME
from moekit.checkpoint.base import TensorMeta
from moekit.errors import DiskError, MoekitError, UsageError, check_utf8

DEFAULT_MAX_SHARD_SIZE = 5 * 1000**3  # transformers' default, "5GB"
# safetensors refuses headers over 100 MB; one-neuron experts mean millions of tiny tensors, so
# a shard also ends when its header would pass this.
MAX_HEADER_BYTES = 64 * 1000**2
_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
          "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "TIB": 1024**4}
TEMP_MARKER = ".moekit-partial-"
OWNER_FILE = ".moekit-owner.json"  # in a partial folder: which host and process write it
OLD_MARKER = ".moekit-old-"  # an output that --overwrite moved aside until the new one is in place
_HIDDEN = re.compile(r"^\.(.*)(" + re.escape(TEMP_MARKER) + "|" + re.escape(OLD_MARKER) + r")(\d+)$")
NAME_MAX = 255  # bytes of one file name on Linux file systems


def hidden_name(name: str, marker: str) -> str:
    """`.NAME<marker>PID`, the hidden sibling an output is built in; a NAME too long for that is
    cut and made unique with a hash of the whole name, so any legal output name works."""
    suffix = f"{marker}{os.getpid()}"
    if len(f".{name}{suffix}".encode()) <= NAME_MAX:
        return f".{name}{suffix}"
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    keep = name.encode()[: NAME_MAX - len(f".-{digest}{suffix}".encode())].decode("utf-8", "ignore")
    return f".{keep}-{digest}{suffix}"


def sweep_partials(folder: Path) -> list[str]:
    """Clean up after runs killed outright (they could not themselves) in `folder`: on this host,
    whose process id no longer runs. Their partial folders are removed; the old output an
    `--overwrite` had moved aside is put back where the new one never arrived, else removed.
    Returns what was done, one phrase each."""
    done = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return done  # a parent that is not there (yet) or unreadable: the writer reports that itself
    for path in entries:
        m = _HIDDEN.match(path.name)
        if not m or not path.is_dir() or path.is_symlink() or _writer_alive(path, int(m.group(3))):
            continue
        name, marker = m.group(1), m.group(2)
        if marker == TEMP_MARKER:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path.name}")
        elif path.name == f".{name}{marker}{m.group(3)}" and len(path.name.encode()) < NAME_MAX:  # not a hashed name
            if (folder / name).exists():  # the swap completed: this is the replaced output
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed {path.name}")
            else:  # killed between the two renames: the old output is the only one
                path.rename(folder / name)
                done.append(f"restored {name} from {path.name}")
    return done


def _writer_alive(partial: Path, pid: int) -> bool:
    try:
        owner = json.loads((partial / OWNER_FILE).read_text())
        if owner.get("host") != socket.gethostname():
            return True  # another machine's (a shared disk): not ours to judge
    except (OSError, ValueError, AttributeError):
        pass  # killed before it wrote its owner file
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def parse_size(text: str | int) -> int:
    """`5GB`, `500MB`, `2GiB` or a number of bytes, as transformers' max_shard_size accepts."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    digits = s.rstrip("KMGTIB")
    try:
        size = int(float(digits) * _UNITS[s[len(digits):]])  # inf and nan raise too
    except (ValueError, KeyError, OverflowError):
        raise UsageError(f"cannot read size {text!r}: write it like 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise UsageError(f"size must be positive, got {text!r}")
    return size


@dataclass
class _Shard:
    file_name: str
    tensors: list[TensorMeta] = field(default_factory=list)

    header_estimate: int = 0

    def add(self, meta: TensorMeta) -> None:
        self.tensors.append(meta)
        self.header_estimate += len(meta.name) + 80  # name, dtype, shape and offsets in JSON

    def header(self) -> bytes:
        entries, offset = {"__metadata__": {"format": "pt"}}, 0
        for t in self.tensors:
            entries[t.name] = {"dtype": SAFETENSORS_NAME[t.dtype], "shape": list(t.shape),
                               "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
        return struct.pack("<Q", len(raw)) + raw


def plan_shards(plan: list[TensorMeta], max_shard_size: int) -> list[_Shard]:
    """Split tensors, in order, into shards no larger than max_shard_size (unless one tensor is)."""
    shards: list[_Shard] = [_Shard("")]
    size = 0
    for meta in plan:
        current = shards[-1]
        if current.tensors and (size + meta.nbytes > max_shard_size or current.header_estimate > MAX_HEADER_BYTES):
            shards.append(_Shard(""))
            size = 0
        shards[-1].add(meta)
        size += meta.nbytes
    n = len(shards)
    for i, shard in enumerate(shards, 1):
        shard.file_name = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
    return shards


def check_target(target: Path, sources: list[Path], overwrite: bool) -> None:
    """Refuse a target that exists (without --overwrite) or that overlaps a source."""
    check_utf8(target, "output")
    too_long = [p for p in Path(target).parts if len(os.fsencode(p)) > NAME_MAX]
    if too_long or len(os.fsencode(target)) >= 4096:
        raise UsageError(f"output {target} is too long for a file system: names take at most {NAME_MAX} bytes, "
                         "paths 4095")
    target = target.expanduser().resolve()
    for src in sources:
        src = src.resolve()
        # A folder source may not hold the output; a file source (.gguf) may sit beside it.
        if target == src or (src.is_dir() and src in target.parents):
            raise UsageError(f"output {target} is the source or inside it; choose a folder elsewhere")
        if target in src.parents:
            raise UsageError(f"output {target} contains the source {src}; choose another folder")
    if target.exists() and not overwrite:
        raise MoekitError(f"output {target} already exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise MoekitError(f"output {target} exists and is not a folder")
    if target.parent.exists() and not target.parent.is_dir():
        raise MoekitError(f"output's parent {target.parent} is not a folder")


class CheckpointWriter:
    """Write a model folder atomically.

    >>> with CheckpointWriter(target, plan, sources=[src]) as out:
    ...     for meta in plan:
    ...         out.write(meta.name, make_tensor(meta))
    ...     out.write_json("config.json", config)
    ...     out.commit()
    """

    def __init__(self, target: Path, plan: list[TensorMeta], *, sources: list[Path] = (),
                 max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False):
        self.target = Path(target).expanduser().resolve()
        check_target(self.target, list(sources), overwrite)
        names = [m.name for m in plan]
        if len(set(names)) != len(names):
            raise ValueError("output plan names a tensor twice")
        self.shards = plan_shards(plan, max_shard_size)
        self.total_bytes = sum(m.nbytes for m in plan)
        self.bytes_written = 0
        self.temp = self.target.parent / hidden_name(self.target.name, TEMP_MARKER)
        self.swept: list[str] = []  # what was cleaned up after killed runs on the way in
        missing = [p for p in self.temp.parents if not p.exists()]
        self._made_parents = missing[::-1]  # created for the output, removed again if it fails
        self._queue = [(shard, meta) for shard in self.shards for meta in shard.tensors]
        self._next = 0
        self._file = None
        self._committed = False

    def __enter__(self) -> CheckpointWriter:
        try:
            self.swept = sweep_partials(self.target.parent)
            if self.temp.exists():
                shutil.rmtree(self.temp)
            self.temp.mkdir(parents=True)
            free = shutil.disk_usage(self.temp).free
            if self.total_bytes > free:  # refused at once, not after minutes of writing
                raise DiskError(f"output {self.target} needs {self.total_bytes / 1e9:,.2f} GB for its weights, its disk "
                                f"has {free / 1e9:,.2f} GB free; nothing was written")
            (self.temp / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        except (OSError, DiskError) as e:
            self.__exit__(type(e), e, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file:
            self._file.close()
        if not self._committed:
            shutil.rmtree(self.temp, ignore_errors=True)
            for folder in reversed(self._made_parents):
                try:
                    folder.rmdir()
                except OSError:
                    break  # not empty (someone else's) or not ours to remove
        if isinstance(exc, OSError) and (exc.filename is None or str(exc.filename).startswith(str(self.temp))):
            exc.filename = str(self.target)  # the user knows the output, not its hidden temporary name

    @property
    def files_dir(self) -> Path:
        """Where side files go before commit (the temporary folder)."""
        return self.temp

    def write(self, name: str, data: torch.Tensor | Iterable[torch.Tensor]) -> None:
        """Write the next tensor of the plan: a tensor, or its dim-0 chunks in order (so a fused
        [experts, ...] tensor can be streamed expert by expert). Name, shape and dtype must match the plan."""
        meta = self._begin(name)
        rows = 0
        for chunk in [data] if isinstance(data, torch.Tensor) else data:
            if chunk.dtype != meta.dtype or tuple(chunk.shape[1:]) != meta.shape[1:] or chunk.dim() != len(meta.shape):
                raise ValueError(f"{name}: got {tuple(chunk.shape)} {chunk.dtype}, plan says {meta.shape} {meta.dtype}")
            _write_all(self._file.fileno(), chunk.detach().cpu().contiguous().view(torch.uint8).numpy().data)
            rows += chunk.shape[0] if chunk.dim() else 1
        if rows != (meta.shape[0] if meta.shape else 1):
            raise ValueError(f"{name}: got {rows} rows, plan says {meta.shape}")
        self._end(meta)

    def copy_bytes(self, name: str, source: Path, start: int, end: int) -> None:
        """Write the next tensor of the plan as a byte range of a source file, copied by the kernel
        (`copy_file_range`, as `cp` does): the bytes never pass through Python or its memory."""
        self.copy_ranges(name, source, [(start, end)])

    def copy_ranges(self, name: str, source: Path, ranges: list[tuple[int, int]]) -> None:
        """`copy_bytes` of several ranges of one source file, concatenated (kept rows of a fused tensor)."""
        meta = self._begin(name)
        size = sum(end - start for start, end in ranges)
        if size != meta.nbytes:
            raise ValueError(f"{name}: {size} source bytes, plan says {meta.nbytes}")
        with open(source, "rb") as src:
            for start, end in ranges:
                _copy_range(src.fileno(), self._file.fileno(), start, end - start)
        self._end(meta)

    def _begin(self, name: str) -> TensorMeta:
        if self._next >= len(self._queue):
            raise ValueError(f"tensor {name} is not in the output plan")
        shard, meta = self._queue[self._next]
        if name != meta.name:
            raise ValueError(f"got {name}, the plan's next tensor is {meta.name}")
        if shard.tensors[0] is meta:
            self._open_shard(shard)
        return meta

    def _end(self, meta: TensorMeta) -> None:
        self.bytes_written += meta.nbytes
        shard = self._queue[self._next][0]
        self._next += 1
        if shard.tensors[-1] is meta:
            self._file.close()
            self._file = None

    def _open_shard(self, shard: _Shard) -> None:
        # Unbuffered: `copy_bytes` writes at the descriptor's offset, so no bytes may wait in a buffer.
        self._file = open(self.temp / shard.file_name, "wb", buffering=0)
        _write_all(self._file.fileno(), shard.header())

    def write_json(self, name: str, data: dict) -> None:
        (self.temp / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

    def write_text(self, name: str, text: str) -> None:
        (self.temp / name).write_text(text)

    def commit(self) -> Path:
        """Check every planned tensor was written, then move the folder into place."""
        if self._next != len(self._queue):
            missing = self._queue[self._next][1].name
            raise ValueError(f"output incomplete: {missing} and {len(self._queue) - self._next - 1} more not written")
        if len(self.shards) > 1:
            weight_map = {m.name: s.file_name for s in self.shards for m in s.tensors}
            self.write_json("model.safetensors.index.json",
                            {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        (self.temp / OWNER_FILE).unlink()
        _fsync_folder(self.temp)
        old = None
        if self.target.exists():  # --overwrite: swap, then delete the old one
            old = self.target.parent / hidden_name(self.target.name, OLD_MARKER)
            self.target.rename(old)
        self.temp.rename(self.target)
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.target


def _write_all(fd: int, data) -> None:
    """os.write until done: one call writes at most ~2 GB, and may write less."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view):]


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy `count` bytes from `src_fd` at `offset` to `dst_fd` at its current position."""
    try:
        while count:
            done = os.copy_file_range(src_fd, dst_fd, count, offset)
            if done == 0:
                raise OSError(f"source ended {count} bytes early")
            offset, count = offset + done, count - done
    except (AttributeError, OSError) as e:  # no copy_file_range here (old kernel, other file systems)
        if isinstance(e, OSError) and e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
        while count:
            block = os.pread(src_fd, min(count, 1 << 24), offset)
            if not block:
                raise OSError(f"source ended {count} bytes early") from None
            _write_all(dst_fd, block)
            offset, count = offset + len(block), count - len(block)


def _fsync_folder(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
