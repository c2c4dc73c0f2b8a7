"""The weights training reads: bf16 with fp32 master copies in the optimiser, or fp32 under autocast."""

from __future__ import annotations

import torch

from moekit.errors import MoekitError, UsageError

WEIGHTS = {"bf16": "bf16, fp32 master copies in the optimiser", "fp32": "fp32, bf16 autocast on the GPU"}  # summary


def resolve_weights(choice: str, cuda: bool, frozen: bool) -> str:
    """`--weights` made definite. auto: bf16 on a GPU that has it when every weight trains, else
    fp32. A freeze manifest keeps fp32: its frozen slices are restored after each step into the
    weights the model holds, which would drift apart from bf16 weights' master copies."""
    if choice == "bf16" and frozen:
        raise UsageError("--weights bf16 trains every weight in bf16 with fp32 master copies; "
                         "with a freeze manifest use --weights fp32")
    if choice == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() and not frozen else "fp32"
    return choice


class MasterWeights:
    """Every trainable floating parameter of `model` cast to bf16 in place, its fp32 value kept as a
    master copy that the optimiser steps instead (`attach`).

    The forward and backward then read and write bf16 with no autocast casts (the residual stream,
    the norms' outputs and the gradients in half the bytes), while AdamW's small updates still add
    up in fp32: stepped on bf16 weights, most updates of a 1e-4 learning rate round away. Before
    each optimiser step the bf16 gradients (already clipped) are copied into the masters' fp32
    gradients; after it, the masters into the bf16 weights. Gradients accumulate over micro-batches
    in bf16, as they are computed.

    The parameters' dtype changes once, here, before DDP wraps the model: assigning `.data` of
    another dtype later would give a parameter a new gradient accumulator, and DDP's hooks on the
    old one would stop all-reducing its gradients. So checkpoints take the masters by name
    (`state_dict`), and only `restore`, after training, puts them back into the model."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and p.is_floating_point()]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.masters = [p.detach().float().clone() for p in self.params]
        with torch.no_grad():
            for p in self.params:
                p.data = p.data.to(dtype)
        self._optimizer: torch.optim.Optimizer | None = None

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Make `optimizer` (built over the model's parameters) step the masters."""
        if optimizer is self._optimizer:  # Trainer may ask for its optimiser again
            return
        self._optimizer = optimizer
        master_of = {id(p): m for p, m in zip(self.params, self.masters)}
        for group in optimizer.param_groups:
            group["params"] = [master_of[id(p)] for p in group["params"]]
        optimizer.register_step_pre_hook(lambda *_: self._grads_to_masters())
        optimizer.register_step_post_hook(lambda *_: self._masters_to_weights())

    @torch.no_grad()
    def _grads_to_masters(self) -> None:
        pairs = []
        for m, p in zip(self.masters, self.params):
            if p.grad is None:  # no gradient this step (an unused weight): the optimiser skips it
                m.grad = None
                continue
            if m.grad is None:
                m.grad = torch.empty_like(m)
            pairs.append((m.grad, p.grad))
        if pairs:  # one foreach kernel for all tensors, as torch's own optimisers step them
            torch._foreach_copy_(*map(list, zip(*pairs)))

    @torch.no_grad()
    def _masters_to_weights(self) -> None:
        torch._foreach_copy_(self.params, self.masters)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The masters by parameter name (a tied weight once, under its first name)."""
        return dict(zip(self.names, self.masters))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Masters from `state_dict`'s names, and the bf16 weights from them."""
        missing = [n for n in self.names if n not in state]
        if missing:
            raise MoekitError(f"the checkpoint has no master copy of {missing[0]} (and {len(missing) - 1} more)")
        for name, m in zip(self.names, self.masters):
            m.copy_(state[name])
        self._masters_to_weights()

    def restore(self) -> None:
        """The model back in fp32 for good, after training (the masters become its weights)."""
        for p, m in zip(self.params, self.masters):
            p.data = m
