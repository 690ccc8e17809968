"""Class-balanced sampling of training images (`train.sampler: balanced`) that works under DDP.

Every rank draws the same weighted stream (with replacement, each image weighted by 1 / the
size of its class, so each class is drawn equally often in expectation), seeded by
`train.seed`, the fold and the epoch; rank r takes items r, r + W, r + 2W, ... of it, so the
ranks' shares are disjoint parts of one stream and together what one process would draw.
This is MONAI's and Catalyst's DistributedWeightedRandomSampler idea; it sits beside
`train.class_weights` (the loss weights), which reweighs the loss instead of the draws.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sized

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from distmed.errors import UserError

log = logging.getLogger(__name__)

# Keeps fold seeds apart from `loop.epoch_seed`'s stream (any fixed odd constant would do).
_FOLD_STRIDE = 7_919


def warn_of_double_balancing(samplers: Collection[str], class_weights: Collection[str]) -> None:
    """Log a warning when a run (or a trial a search can draw: every value of each key)
    balances the classes twice. Balanced draws already show each class equally often; loss
    weights of 1 / class frequency, taken from the fold's labels rather than the draws, then
    weigh each rare image up by the class-size ratio again. Not an error: a valid, if rarely
    wanted, experiment."""
    if "balanced" in samplers and "balanced" in class_weights:
        log.warning(
            "train.sampler: balanced with train.class_weights: balanced weighs the classes "
            "twice (the draws already balance them, the loss weights then favour the rarer "
            "classes again); keep one: set train.class_weights: none or train.sampler: shuffle"
        )


class BalancedSampler(DistributedSampler):
    """Rank `rank`'s share of one class-balanced stream of `len(dataset)` draws, rounded up to
    a multiple of `num_replicas` (as `DistributedSampler` pads).

    A `DistributedSampler` so that Ray Train's `prepare_data_loader` keeps it; `set_epoch`
    (inherited) gives every epoch a new stream, the same one on every rank.

    Args:
        weights: (N,) non-negative draw weight of each image in `dataset`.
        num_replicas, rank: the DDP world size and this rank (explicit: no process group
            is needed).
        seed: the stream's seed; the epoch is added to it.
    """

    def __init__(
        self, dataset: Sized, weights: np.ndarray, num_replicas: int, rank: int, seed: int
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)  # type: ignore[arg-type]
        if len(weights) != len(dataset) or not np.isfinite(weights).all() or weights.sum() <= 0:
            raise ValueError("weights need one finite, non-negative value per image, not all 0")
        self.weights = torch.as_tensor(weights, dtype=torch.float64)

    def stream(self) -> torch.Tensor:
        """The whole epoch's draws (`total_size` dataset positions), identical on every rank."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.multinomial(self.weights, self.total_size, True, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.stream()[self.rank :: self.num_replicas].tolist())


def balanced_weights(labels: np.ndarray) -> np.ndarray:
    """(N,) weight 1 / n_k of each image of class k, from (N,) class indices: every class
    present gets the same total weight (sklearn's 'balanced' class weights, per sample).

    Raises:
        UserError: labels are not one class per image (a multi-label task's (N, L) array).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise UserError(
            "train.sampler=balanced draws each class equally often, but this task has several "
            "labels per image; set train.sampler=shuffle (or train.class_weights)"
        )
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse]


def train_sampler(
    setting: str, dataset: Sized, labels: np.ndarray, seed: int, fold: int
) -> BalancedSampler | None:
    """The training loader's sampler for `train.sampler`: None for 'shuffle' (the loader
    shuffles; Ray puts a `DistributedSampler` there), a `BalancedSampler` for this rank of
    the initialised process group (rank 0 of 1 without one) for 'balanced'.

    Raises:
        UserError: 'balanced' for labels without one class per image.
    """
    if setting != "balanced":
        return None
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    weights = balanced_weights(labels)
    return BalancedSampler(dataset, weights, world, rank, seed * _FOLD_STRIDE + fold)
