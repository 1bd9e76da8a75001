"""troupe.bench: the ``troupe bench`` measurements, a client of troupe like any other.

batching  batching.py: batched vs one at a time; cache reuse (``troupe bench``).
tiers     tiers.py: ``troupe bench ttft``, ``bytes`` and ``scale``.
overhead  overhead.py: troupe's costs over a bare mlx-lm ``BatchGenerator``, actor round
          trips, event-loop lag, inter-token latency.
peer      peer.py: multi-agent workloads on troupe and on ``mlx_lm.server``.

These modules reach troupe only through its public API (``troupe``, ``troupe.kernel``):
what they measure is what an application gets. Baselines (the bare ``BatchGenerator``,
``mlx_lm.server``) use mlx-lm directly, never troupe's adapter around it.
tests/test_package.py holds the rule. The CLI imports each module on demand.
"""
