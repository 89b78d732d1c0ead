"""A training's progress: one :class:`EpochRecord` per epoch, and the :class:`TrainState`
that :func:`aekit.training.fit` advances and hands on, and that a checkpoint holds
(:mod:`aekit.weights`) and history.csv lists (:mod:`aekit.runs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from aekit._typed import from_plain


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    val_loss: float
    val_mse: float
    seconds: float
    images_per_second: float
    parts: dict[str, float] = field(default_factory=dict)  # the objective's named parts, and val_ ones


@dataclass
class TrainState:
    """What a checkpoint holds beside the weights and the optimiser.

    Between epochs ``step``, ``loss_sum`` and ``seconds`` are 0. A state that :func:`aekit.training.fit`
    hands to ``on_interrupt`` is part-way through epoch ``epoch + 1``: its first ``step``
    batches are trained, with the summed loss ``loss_sum`` and the time ``seconds`` so far
    (on rank 0 of a DDP run, that rank's rows); the shuffle, the noise and the learning rate
    of the batches left follow from (seed, epoch, step), so training goes on exactly.
    Checkpoints from before these fields load as a state between epochs.
    """

    epoch: int = 0                                   # epochs completed
    history: list[EpochRecord] = field(default_factory=list)
    best_val_loss: float = math.inf
    epochs_since_best: int = 0
    best_epoch: int = 0                              # the epoch of best_val_loss (0: none yet)
    stopped_early: bool = False
    step: int = 0                                    # batches done of epoch `epoch + 1`
    steps_per_epoch: int = 0                         # of the run that saved it (0: unknown)
    loss_sum: float = 0.0                            # those batches' summed loss
    seconds: float = 0.0                             # and their time
    parts_sum: dict[str, float] = field(default_factory=dict)  # and their summed loss parts

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        state = from_plain(cls, data, "state")
        if state.epoch < 0 or state.epochs_since_best < 0 or len(state.history) != state.epoch:
            raise ValueError(f"inconsistent progress: epoch {state.epoch}, {len(state.history)} history rows")
        if not 0 <= state.step <= state.steps_per_epoch:
            raise ValueError(f"inconsistent progress: step {state.step} of {state.steps_per_epoch}")
        return state

    def finish_epoch(self, record: EpochRecord) -> None:
        self.history.append(record)
        self.epoch, self.step, self.loss_sum, self.seconds, self.parts_sum = record.epoch, 0, 0.0, 0.0, {}


__all__ = ["EpochRecord", "TrainState"]
