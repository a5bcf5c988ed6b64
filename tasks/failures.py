"""Failures that a retry cannot help: the trial's own settings cause them.

A study retries a failed trial (``study.retries``) because most failures belong to the
infrastructure: a worker lost, a database restarting, a board unreachable. A failure that
follows from the trial's settings and inputs alone (its training diverged, the compiler
refuses its model or calibration set) would happen again the same way, so the study loop
tells it FAIL with its reason and enqueues no retry. Such failures derive from
``DeterministicFailure``; a stage run on a work pool reports them by their class name,
which ``deterministic_names`` lists for the loop.
"""

from __future__ import annotations

import math


class DeterministicFailure(RuntimeError):
    """A failure that would repeat with the same settings: the study does not retry it."""


class TrainingDiverged(DeterministicFailure):
    """The training loss became non-finite or exploded (``tasks.training.fmfp``)."""

    def __init__(self, message: str, epoch: int = -1, loss: float = math.nan) -> None:
        # Only the message goes to the base: a pickled copy (a stage on a work pool) is
        # rebuilt from it, and the attributes travel in the instance's __dict__.
        super().__init__(message)
        self.epoch = epoch
        self.loss = loss


def deterministic_names() -> list[str]:
    """The class names of every ``DeterministicFailure`` defined so far (subclasses of
    subclasses too): how the loop recognises one in a stage run's final state message."""
    found: list[str] = []
    todo: list[type[DeterministicFailure]] = [DeterministicFailure]
    while todo:
        cls = todo.pop()
        found.append(cls.__name__)
        todo.extend(cls.__subclasses__())
    return sorted(found)
