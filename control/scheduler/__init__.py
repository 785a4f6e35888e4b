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
