"""A parameter set the study has already finished is answered from that trial, not trained.

Samplers ask points again, often in small or discrete spaces (in the sample-efficiency
benchmark 23% of TPE's asks, and up to 47% with a pruner). With reproducible trials
(``tasks.seeding``) training the same parameters again gives the same result, so a repeat
is told the earlier trial's value (or pruned at the same epochs, with the same
intermediate values) and keeps its metrics, its MLflow run id and artifacts; it is marked
``repeat_of`` and costs no training, compilation or board time. It still counts as a trial
toward ``n_trials``: the sampler got its answer. ``study.repeats: train`` trains repeats
again (to see the noise of a non-deterministic GPU, say).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from tasks.hpo import optuna_ops
from tasks.hpo.recovery import ATTR_ATTEMPT, ATTR_HEARTBEAT, ATTR_OWNER, ATTR_RETRY_OF, ATTR_STAGE
from tasks.hpo.study import ATTR_REJECTED, ATTR_REPEAT_OF, Goals

#: What belongs to the asking trial itself, never copied from the earlier one.
_OWN = {ATTR_OWNER, ATTR_HEARTBEAT, ATTR_STAGE, ATTR_RETRY_OF, ATTR_ATTEMPT, ATTR_REJECTED}
_TIMES = ("_started", "_finished", "_at")


def earlier_result(trials: Sequence[FrozenTrial], trial: optuna.Trial) -> FrozenTrial | None:
    """The first finished (complete or pruned) trial of the study's ``trials`` with
    ``trial``'s parameters (one finished since they were read is not seen: its
    parameters are trained again, as with ``repeats: train``)."""
    params = trial.params
    for other in trials:
        if (
            other.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and other.number != trial.number
            and other.params == params
            and not other.user_attrs.get(ATTR_REJECTED)
        ):
            return other
    return None


def answer(study: optuna.Study, trial: optuna.Trial, earlier: FrozenTrial, goals: Goals) -> Any:
    """Tell ``trial`` what ``earlier`` measured; returns the state told. Its attributes are
    written in one transaction (with its feasibility, when it completed)."""
    copied = {
        key: value
        for key, value in earlier.user_attrs.items()
        if key not in _OWN and not key.endswith(_TIMES)  # its times are not this trial's
    }
    copied[ATTR_REPEAT_OF] = earlier.user_attrs.get(ATTR_REPEAT_OF, earlier.number)
    if earlier.state == TrialState.COMPLETE:
        goals.constrain(trial, earlier.user_attrs, copied)
        values = list(earlier.values or [])
        study.tell(trial, values if goals.multi else values[0])
        return TrialState.COMPLETE
    optuna_ops.set_attrs(trial, copied)
    for step, value in sorted(earlier.intermediate_values.items()):
        trial.report(value, step)
    study.tell(trial, state=TrialState.PRUNED)
    return TrialState.PRUNED
