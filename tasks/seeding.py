"""Seeds of one trial, derived from the study's seed and the trial's parameters.

A trial owns its randomness: its initial weights, shuffling, augmentation and in-model
noise (dropout, stochastic depth) draw from generators seeded here, never from a global
generator that another trial in the same process also draws from. The same study seed
and parameters give the same seed, whatever ran before or beside the trial; a
``replicate`` number gives the same parameter set another, independent seed (re-training
the best trials with several seeds).

Kept free of torch: the engine records the seeds without loading it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

#: Seeds fit in 63 bits: torch generators take them, and numpy's ``default_rng`` too.
_BITS = 63


def _digest(*parts: str) -> int:
    data = "\x1f".join(parts).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") >> (64 - _BITS)


def trial_seed(study_seed: int, params: Mapping[str, Any], replicate: int = 0) -> int:
    """The seed of the trial with ``params`` in a study seeded ``study_seed``."""
    canonical = json.dumps(dict(params), sort_keys=True, default=str)
    return _digest("trial", str(study_seed), canonical, str(replicate))


def derive(seed: int, purpose: str) -> int:
    """An independent seed for one use (``init``, ``shuffle``, ``noise``) of a trial seed."""
    return _digest("use", str(seed), purpose)
