"""The built-in demo: a procedurally drawn image world, its loopback server, tiny models."""
