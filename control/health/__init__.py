"""Health checks as a Consul agent runs them: probes (HTTP, TCP, script) and the
runner that keeps each check of this node's instances current in the registry."""
