"""Parallelism: the device mesh and logical sharding rules (mesh.py); MR-SP (sequence.py)."""
