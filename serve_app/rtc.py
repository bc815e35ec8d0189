"""Real-time chunking: the rows a robot executes while its request is in flight are already decided.

A request with `prefix_action` and `delay` d gets back a chunk whose first d rows
are that prefix, exactly as sent, whatever the policy computed for them. Policies
may use the prefix to guide sampling (pi05 does); this is where the rule is kept,
once, for every policy.
"""

from __future__ import annotations

import numpy as np

from serve_app.observation import ObservationBatch


def pin_prefix(actions: np.ndarray, batch: ObservationBatch) -> np.ndarray:
    """actions (B, chunk_length, action_dim) in robot units, with each row's first `delay` rows replaced in place."""
    for i in np.flatnonzero(batch.delay):
        d = int(batch.delay[i])
        actions[i, :d] = batch.prefix[i, :d]
    return actions
