"""Test session set-up: 8 fake CPU devices (set before jax is imported) and float32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def rollout_server(tmp_path_factory):
    """One real rollout server (vLLM engine, gRPC) shared by every test module that needs it:
    an engine start costs 15-40 s (tests/rollout_fixtures.py)."""
    from rollout_fixtures import start_shared_server
    yield from start_shared_server(tmp_path_factory)
