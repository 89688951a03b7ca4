"""Machinery every run shares: config, mesh, sharding, optimizer, checkpoints, metrics, loop."""
