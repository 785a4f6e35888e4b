"""Control plane: registry, agent composition, HTTP API and CLI."""
