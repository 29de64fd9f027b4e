"""Rollout server: PyTorch + vLLM behind gRPC. Imports nothing from JAX."""
