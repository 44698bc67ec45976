"""Training losses: the abnormality loss (BCE, positive-weighted BCE or focal) plus the auxiliary body-part term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss


def abnormal_loss(
    logits: Tensor, labels: Tensor, *, kind: str, pos_weight: float | None = None, gamma: float = 2.0
) -> Tensor:
    """Binary loss over rows with a known label: BCE, positive-weighted BCE or focal loss (mean)."""
    logits, labels = logits.float(), labels.float()
    if kind == "focal":  # alpha < 0: no class weighting, as in the `focal` recipe (gamma only)
        return sigmoid_focal_loss(logits, labels, alpha=-1, gamma=gamma, reduction="mean")
    weight = torch.tensor(pos_weight, device=logits.device) if kind == "weighted" and pos_weight else None
    return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight)


def multitask_loss(
    out: dict[str, Tensor], labels: Tensor, body_parts: Tensor, *, kind: str, pos_weight: float | None,
    gamma: float, body_part_weight: float,
) -> tuple[Tensor, Tensor]:
    """(total loss, abnormality loss); body-part cross-entropy ignores rows whose body part is unknown.

    Every output stays in the graph: when the body-part term is left out (weight 0, or no row with a known body part,
    as in a fracture set without body parts) the head is added at zero weight, so it still gets a (zero) gradient —
    DistributedDataParallel fails the next step when a trained parameter got none on some worker.
    """
    ab = abnormal_loss(out["abnormal"], labels, kind=kind, pos_weight=pos_weight, gamma=gamma)
    total = ab
    if "body_part" in out:
        if body_part_weight > 0 and bool((body_parts >= 0).any()):
            total = total + body_part_weight * F.cross_entropy(out["body_part"].float(), body_parts, ignore_index=-1)
        else:
            total = total + out["body_part"].float().sum() * 0.0
    return total, ab
