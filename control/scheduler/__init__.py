"""Manifold: a scheduler on the mesh that turns jobs into allocations on nodes.

One concept per module. Pure, no I/O: ``spec`` (the job file, checked field by
field), ``constraints`` (Nomad's operators), ``nodes`` (a host as a node),
``cluster`` (usage as arrays), ``placement`` (feasibility, then ranking),
``explain`` (why), ``alloc`` (lifecycle table and history), ``reconcile``
(desired vs actual -> a plan), ``rebalance`` and ``service`` (the state, evaluated
on every change). Around them: ``drivers`` (docker, exec), ``executor`` (an agent
runs and restarts its allocations), ``runtime`` (nodes and the elected leader over
the registry and duplex), ``host`` (the pieces of one agent), ``operations``,
``api`` and ``cli`` (Nomad's HTTP paths and commands).
"""

import os

# The scheduler's arrays are small (nodes x resources): a BLAS thread pool buys
# nothing, and a thread started at import would keep the capabilities the agent
# drops before it starts (control/privileges.py would then have to re-execute it).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
