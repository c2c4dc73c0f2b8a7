"""The plan types of a surgery's output: each output tensor as a header, a function that makes it,
and where its bytes already lie in a source file (so the writer can copy them). Leaf types: the
planners build them, the planned checkpoint reads them, the executor (moekit.report.write) writes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from moekit.checkpoint.base import Checkpoint, TensorMeta


@dataclass(frozen=True)
class OutputTensor:
    meta: TensorMeta
    produce: Callable[[], torch.Tensor]
    # The output is byte for byte this source tensor, or its dim-0 rows [a, b), or several such
    # row ranges one after the other ((a, b), (c, d), ...): the writer may copy it file to file.
    copy_of: tuple[Checkpoint, str] | None = None
    rows: tuple[int, int] | tuple[tuple[int, int], ...] | None = None

    def source_ranges(self) -> tuple[Path, list[tuple[int, int]]] | None:
        """(file, [(start, end), ...]): the output's bytes as ranges of one source file, in order."""
        if not self.copy_of:
            return None
        ckpt, name = self.copy_of
        where = ckpt.byte_range(name)
        if where is None:
            return None
        path, start, end = where
        if self.rows is None:
            return path, [(start, end)]
        row = (end - start) // ckpt.meta(name).shape[0]
        runs = [self.rows] if isinstance(self.rows[0], int) else self.rows
        return path, [(start + a * row, start + b * row) for a, b in runs]

    def source_bytes(self) -> tuple[Path, int, int] | None:
        """(file, start, end) when the output is one contiguous range of a source file."""
        where = self.source_ranges()
        if where is None or len(where[1]) != 1:
            return None
        return where[0], *where[1][0]


def passthrough(ckpt: Checkpoint, meta: TensorMeta, dtype: torch.dtype | None) -> OutputTensor:
    """A source tensor copied as it is; floating-point ones cast to `dtype` when given."""
    cast = dtype if dtype is not None and meta.dtype.is_floating_point else meta.dtype
    return OutputTensor(TensorMeta(meta.name, meta.shape, cast), lambda: ckpt.load(meta.name, cast),
                        copy_of=(ckpt, meta.name) if cast == meta.dtype else None)
