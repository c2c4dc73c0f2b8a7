"""A planned output seen as a checkpoint, so that surgeries compose without writing to disk:
`split-granularity` of a dense model reads the (virtual) upcycled model tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.checkpoint.base import Checkpoint, TensorMeta, cast
from moekit.checkpoint.plan import OutputTensor


class PlannedCheckpoint(Checkpoint):
    def __init__(self, base: Checkpoint, outputs: list[OutputTensor], config: dict):
        super().__init__(base.path)
        self._base, self._config = base, config
        self._outputs = {o.meta.name: o for o in outputs}
        self._tensors = {o.meta.name: o.meta for o in outputs}

    @property
    def config(self) -> dict:
        return self._config

    @property
    def tensors(self) -> dict[str, TensorMeta]:
        return self._tensors

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        self.meta(name)
        data = self._outputs[name].produce()
        return cast(data if isinstance(data, torch.Tensor) else torch.cat(list(data)), dtype)

    def byte_range(self, name: str) -> tuple[Path, int, int] | None:
        self.meta(name)
        return self._outputs[name].source_bytes()

    def weight_files(self) -> list[Path]:
        return self._base.weight_files()

    def write_side_files(self, dest: Path) -> list[str]:
        return self._base.write_side_files(dest)
