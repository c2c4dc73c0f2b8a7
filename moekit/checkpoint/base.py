"""What every checkpoint reader is: a config, tensor headers, and tensors loaded one at a time.
A leaf module (the readers, the planned checkpoint and the plan types build on it)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.errors import MoekitError


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class Checkpoint(ABC):
    """A model on disk: config, tensor headers, and tensors loaded one at a time."""

    def __init__(self, path: Path):
        self.path = path

    @property
    @abstractmethod
    def config(self) -> dict: ...

    @property
    @abstractmethod
    def tensors(self) -> dict[str, TensorMeta]:
        """Headers of every tensor, in file order; reading them loads no weights."""

    @abstractmethod
    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor, as a fresh CPU tensor, cast to `dtype` when given."""

    @abstractmethod
    def weight_files(self) -> list[Path]:
        """The files that hold the weights (for sizes and provenance hashes)."""

    @abstractmethod
    def write_side_files(self, dest: Path) -> list[str]:
        """Write tokenizer files, chat template and generation config into `dest`; return their names."""

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        """(file, start, end) when the tensor's bytes lie in a file exactly as a safetensors output
        stores them (so a writer can copy them without loading); None otherwise."""
        return None

    def meta(self, name: str) -> TensorMeta:
        try:
            return self.tensors[name]
        except KeyError:
            raise MoekitError(f"{self.path}: no tensor named {name!r}") from None

    def close(self) -> None:
        """Release open file handles (readers hold them between `load` calls)."""


def cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` in `dtype` (itself when it already is, or when dtype is None)."""
    return t if dtype is None or t.dtype == dtype else t.to(dtype)
