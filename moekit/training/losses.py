"""The per-token losses of training and evaluation: next-token cross-entropy and KD. The balance
losses (Switch, z-loss) are `moekit.metrics`'."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            rows: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher ‖ student) per token, in fp32, averaged over the tokens of the selected `rows`
    (a boolean over the batch; all rows by default). The teacher's logits carry no gradient."""
    if rows is not None:
        student_logits, teacher_logits = student_logits[rows], teacher_logits[rows]
    if student_logits.numel() == 0:
        return student_logits.sum() * 0.0  # no row to distil on: a zero that keeps the graph
    t = teacher_logits.detach().float().log_softmax(-1)
    s = student_logits.float().log_softmax(-1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each position's logits against the next token, in fp32 (zero on no rows)."""
    if ids.shape[0] == 0:
        return logits.sum() * 0.0
    # The labels shift, not the logits: logits[:, :-1] would copy the whole [B, S, vocab] tensor.
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction=reduction)


@torch.no_grad()
def token_loss_sum(model, rows: list[list[int]], batch_size: int = 8) -> tuple[float, int]:
    """(summed next-token cross-entropy, tokens predicted) of `model` over token rows (no dropout,
    no gradients; one copy to the host at the end)."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for s in range(0, len(rows), batch_size):
        ids = torch.tensor(rows[s : s + batch_size], device=device)
        logits = model(input_ids=ids, use_cache=False).logits
        total += next_token_loss(logits, ids, reduction="sum")
        count += ids[:, 1:].numel()
    model.train(was_training)
    return float(total), count


def mean_token_loss(model, rows: list[list[int]], batch_size: int = 8) -> float:
    """Mean next-token cross-entropy of `model` over token rows."""
    total, count = token_loss_sum(model, rows, batch_size)
    return total / count
