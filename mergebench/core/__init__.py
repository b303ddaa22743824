"""The core engine: hookspecs, plugin manager, registries, tensor I/O and the streaming merge engine."""
