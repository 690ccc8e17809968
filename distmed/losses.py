"""Training losses beyond plain cross-entropy, and mixed (mixup/cutmix) batches.

Owns the loss settings a `Task` builds its loss from (`LossSpec`: label smoothing, focal
gamma), the softmax losses over K logits that take class indices (N,) or class
probabilities (N, K) as targets (what mixup and cutmix produce), a sigmoid loss over L
logits for binary-per-output tasks (BCE or torchvision's `sigmoid_focal_loss`), the
multi-label task's BCE that leaves ignored labels out (`MaskedBCEWithLogits`), and `BatchMixer`,
torchvision's `MixUp`/`CutMix` on a normalised float batch on the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LossSpec:
    """How the task's loss is shaped (`train.label_smoothing`, `train.loss`, `train.focal_gamma`).

    `focal_gamma` None: cross-entropy (today's loss); a number: focal loss with that gamma.
    """

    label_smoothing: float = 0.0
    focal_gamma: float | None = None


PLAIN_LOSS = LossSpec()  # cross-entropy, no smoothing: the loss of before the recipe keys


class SoftmaxLoss(nn.Module):
    """Cross-entropy or multi-class focal loss over K logits, mean over the batch.

    Targets are class indices (N,) or class probabilities (N, K) (mixed batches). With
    label smoothing eps the target becomes (1 - eps) * target + eps / K (Szegedy et al. 2016,
    as `nn.CrossEntropyLoss(label_smoothing=)`). `weight` (K,) weighs each class's term.

    Focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection", eq. 4, in its
    multi-class form as in kornia.losses.focal_loss): -sum_k w_k t_k (1 - p_k)^gamma log p_k,
    with p = softmax(logits) and t the (smoothed) target; gamma = 0 is cross-entropy. The
    class weights play the part of the paper's alpha. Unlike `nn.CrossEntropyLoss` with
    weights, the mean is over samples, not over their weights.
    """

    def __init__(self, weight: torch.Tensor | None = None, spec: LossSpec = PLAIN_LOSS) -> None:
        super().__init__()
        self.weight: torch.Tensor | None
        self.register_buffer("weight", weight)
        self.spec = spec
        self.cross_entropy = nn.CrossEntropyLoss(
            weight=weight, label_smoothing=spec.label_smoothing
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.spec.focal_gamma is None:
            return self.cross_entropy(logits, target)
        log_probs = torch.log_softmax(logits.float(), dim=1)
        k = logits.shape[1]
        soft = target.float() if target.is_floating_point() else F.one_hot(target, k).float()
        eps = self.spec.label_smoothing
        soft = soft * (1 - eps) + eps / k
        modulating = (1 - log_probs.exp()).pow(self.spec.focal_gamma)
        terms = -soft * modulating * log_probs
        if self.weight is not None:
            terms = terms * self.weight
        return terms.sum(dim=1).mean()


class SigmoidLoss(nn.Module):
    """Binary cross-entropy or sigmoid focal loss over L independent logits (multi-label).

    Targets are (N, L) floats in [0, 1]; label smoothing moves them to t (1 - eps) + eps / 2.
    Focal: `torchvision.ops.sigmoid_focal_loss` with alpha = -1 (no alpha weighting; the
    class weights `pos_weight`-free form), mean over every element; gamma = 0 is BCE.
    """

    def __init__(self, spec: LossSpec = PLAIN_LOSS) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from torchvision.ops import sigmoid_focal_loss

        eps = self.spec.label_smoothing
        soft = target.float() * (1 - eps) + eps / 2
        if self.spec.focal_gamma is None:
            return F.binary_cross_entropy_with_logits(logits.float(), soft)
        return sigmoid_focal_loss(
            logits.float(), soft, alpha=-1, gamma=self.spec.focal_gamma, reduction="mean"
        )


class MaskedBCEWithLogits(nn.Module):
    """Binary cross-entropy with logits per finding, averaged over the known targets only.

    For logits z (N, L) and targets y (N, L) with NaN where a label is ignored, the mask
    m = [y is not NaN] and, per finding l, `pos_weight` p_l (1 when not given):

        loss = sum_il m_il * -(p_l y_il log s(z_il) + (1 - y_il) log(1 - s(z_il))) / sum_il m_il

    (s the sigmoid; the per-element term is PyTorch's `BCEWithLogitsLoss` with `pos_weight`).
    A masked entry adds nothing to the loss or its gradient; a batch with every entry masked
    gives 0.
    """

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight)
        self.pos_weight: torch.Tensor | None

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        known = ~torch.isnan(targets)
        per_entry = F.binary_cross_entropy_with_logits(
            logits.float(),
            torch.where(known, targets, 0.0).float(),
            pos_weight=self.pos_weight,
            reduction="none",
        )
        return (per_entry * known).sum() / known.sum().clamp_min(1)


class BatchMixer:
    """Mixup and/or cutmix of a training batch: (inputs, labels) -> (mixed inputs, targets).

    torchvision's `transforms.v2.MixUp`/`CutMix` (Zhang et al. 2018; Yun et al. 2019): one
    lambda ~ Beta(alpha, alpha) per batch, each image paired with the one before it (the
    loader shuffles), targets mixed with the same lambda (cutmix's corrected by the pasted
    area), so every target row sums to one. With both on, each batch draws one of them
    (probability 1/2, timm's default switch). They work on any float tensor on any device,
    here the normalised batch (mixing is linear, so mixing before or after the per-channel
    normalisation is the same), and take class indices (N,) or probabilities (N, K).
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int) -> None:
        from torchvision.transforms import v2

        chosen = [
            kind(alpha=alpha, num_classes=num_classes)
            for kind, alpha in ((v2.MixUp, mixup_alpha), (v2.CutMix, cutmix_alpha))
            if alpha > 0
        ]
        if not chosen:
            raise ValueError("a BatchMixer needs mixup_alpha or cutmix_alpha > 0")
        self.transform = chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)

    def __call__(
        self, inputs: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mixed, targets = self.transform(inputs, labels)
        return mixed, targets
