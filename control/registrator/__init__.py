"""The registrator: Docker containers' services into a registry, as gliderlabs/registrator.

``derive`` turns a container's inspect data into services (pure), ``checks``
maps SERVICE_CHECK_* onto Consul checks (pure), ``flags`` parses registrator's
command line (pure), ``adapters`` write to each kind of store, ``bridge`` keeps
the store equal to the running containers, ``runner`` drives it from Docker's
events, ``cli`` is ``consulate registrator`` and ``agentmode`` runs it inside
``consulate agent``.
"""
