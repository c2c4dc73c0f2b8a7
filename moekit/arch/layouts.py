"""Where an architecture keeps one MoE layer's experts on disk, and how an expert's SwiGLU matrices
(gate [I, H], up [I, H], down [H, I]) are read from it and written to it.

Two layouts exist: a tensor per expert and projection (`PerExpert`, the Hub format of most
families) and all experts of a layer stacked in two tensors (`Fused`, Granite's). Surgeries read
and emit experts through these objects only, so no planner branches on the layout.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch

from moekit.checkpoint import OutputTensor, TensorMeta

PROJS = ("gate", "up", "down")  # moekit's names for a SwiGLU FFN's projections
HF_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}

Weight = Callable[[int, str], torch.Tensor]  # (expert, projection) -> its matrix
Copy = Callable[[int, str], dict]  # (expert, projection) -> OutputTensor's copy_of / rows, or {}
Load = Callable[[str], torch.Tensor]  # tensor name -> tensor


def expert_shape(proj: str, width: int, hidden: int) -> tuple[int, int]:
    return (hidden, width) if proj == "down" else (width, hidden)


class ExpertLayout(ABC):
    """The tensors that hold one layer's experts; `{i}` in a key template is the layer."""

    @abstractmethod
    def shapes(self, i: int, n: int, width: int, hidden: int) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every tensor that holds layer i's n experts of width `width`."""

    @abstractmethod
    def read(self, load: Load, i: int, e: int, proj: str) -> torch.Tensor:
        """One of expert e's matrices in layer i, from the tensors `load` gives."""

    @abstractmethod
    def emit(self, i: int, n: int, width: int, hidden: int, dtype: torch.dtype, weight: Weight,
             copy: Copy | None = None) -> list[OutputTensor]:
        """Output tensors that hold experts 0..n-1 of layer i, expert e's matrices made by
        `weight(e, proj)`; `copy(e, proj)` names source bytes a matrix is a copy of (where the
        layout keeps matrices in tensors of their own)."""

    @abstractmethod
    def select(self, i: int, kept: list[int]) -> list[tuple[str, str, list[int] | None]]:
        """Experts `kept` of layer i renumbered 0..: (output name, source name, source rows, or
        None for the whole source tensor)."""

    @abstractmethod
    def prefix(self, i: int) -> str:
        """Tensor names that start with it hold layer i's experts."""

    def names(self, i: int, n: int) -> list[str]:
        return list(self.shapes(i, n, 1, 1))

    def tensor_name(self, i: int, e: int, proj: str) -> str | None:
        """The tensor that holds exactly this matrix, where the layout has one."""
        return None

    def expert_of(self, name: str) -> int | None:
        """The expert a tensor of its own belongs to, where the layout has such tensors."""
        return None

    def row_tensors(self, i: int) -> tuple[str, ...]:
        """Tensors whose dim-0 rows are experts."""
        return ()


@dataclass(frozen=True)
class PerExpert(ExpertLayout):
    """One tensor per expert and projection: `template` with `{i}`, `{e}` and `{proj}`, the
    projection named by `proj` (moekit's gate/up/down -> the architecture's names). A template
    without `{e}` holds a single expert (a shared expert)."""

    template: str
    proj: dict[str, str] = field(default_factory=lambda: dict(HF_PROJ))

    def tensor_name(self, i: int, e: int, proj: str) -> str:
        return self.template.format(i=i, e=e, proj=self.proj[proj])

    def shapes(self, i, n, width, hidden):
        return {self.tensor_name(i, e, p): expert_shape(p, width, hidden) for e in range(n) for p in PROJS}

    def read(self, load, i, e, proj):
        return load(self.tensor_name(i, e, proj))

    def emit(self, i, n, width, hidden, dtype, weight, copy=None):
        return [OutputTensor(TensorMeta(self.tensor_name(i, e, p), expert_shape(p, width, hidden), dtype),
                             lambda e=e, p=p: weight(e, p), **(copy(e, p) if copy else {}))
                for e in range(n) for p in PROJS]

    def select(self, i, kept):
        return [(self.tensor_name(i, j, p), self.tensor_name(i, e, p), None) for j, e in enumerate(kept) for p in PROJS]

    def prefix(self, i):
        return self.template.split("{e}")[0].format(i=i)

    def expert_of(self, name):
        pattern = re.escape(self.template).replace(r"\{i\}", r"\d+").replace(r"\{e\}", r"(\d+)")
        m = re.fullmatch(pattern.replace(r"\{proj\}", r"[^.]+"), name)
        return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Fused(ExpertLayout):
    """A layer's experts in two tensors: `gate_up` [E, 2I, H] (each expert's gate rows, then its up
    rows) and `down` [E, H, I], written expert by expert so memory stays at one expert. Without
    `expert_axis` the tensors hold one expert, [2I, H] and [H, I] (a shared MLP)."""

    gate_up: str
    down: str
    expert_axis: bool = True

    def shapes(self, i, n, width, hidden):
        lead = (n,) if self.expert_axis else ()
        return {self.gate_up.format(i=i): (*lead, 2 * width, hidden), self.down.format(i=i): (*lead, hidden, width)}

    def read(self, load, i, e, proj):
        name = self.down if proj == "down" else self.gate_up
        w = load(name.format(i=i))
        w = w[e] if self.expert_axis else w
        return w if proj == "down" else w.chunk(2)[PROJS.index(proj)]

    def emit(self, i, n, width, hidden, dtype, weight, copy=None):
        (gate_up, gate_up_shape), (down, down_shape) = self.shapes(i, n, width, hidden).items()

        def gate_up_of(e: int) -> torch.Tensor:
            return torch.cat([weight(e, "gate"), weight(e, "up")])

        if not self.expert_axis:
            return [OutputTensor(TensorMeta(gate_up, gate_up_shape, dtype), lambda: gate_up_of(0)),
                    OutputTensor(TensorMeta(down, down_shape, dtype), lambda: weight(0, "down"))]
        return [OutputTensor(TensorMeta(gate_up, gate_up_shape, dtype),
                             lambda: (gate_up_of(e)[None] for e in range(n))),
                OutputTensor(TensorMeta(down, down_shape, dtype), lambda: (weight(e, "down")[None] for e in range(n)))]

    def select(self, i, kept):
        return [(name, name, kept) for name in self.row_tensors(i)]

    def prefix(self, i):
        return self.gate_up.format(i=i)

    def row_tensors(self, i):
        return (self.gate_up.format(i=i), self.down.format(i=i)) if self.expert_axis else ()
