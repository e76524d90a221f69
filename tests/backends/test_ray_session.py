"""A Ray cluster's address is checked in seconds: refused, malformed, or a running cluster."""
from __future__ import annotations

import time

import pytest

from colaft.backends.ray import RayBackend
from colaft.backends.ray_session import check_reachable
from colaft.serve.launch import free_port


def test_an_unreachable_ray_address_fails_within_seconds():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"no Ray cluster reachable at {address}"):
        RayBackend(address=address, connect_timeout=2.0)
    assert time.monotonic() - start < 4.0
    with pytest.raises(ValueError, match="HOST:PORT"):
        RayBackend(address="no-port-here")


def test_a_running_ray_cluster_passes_the_address_check(ray_session):
    import ray
    check_reachable(ray.get_runtime_context().gcs_address, timeout=5.0)
