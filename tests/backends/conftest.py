"""Fixtures of the backends' tests: a private Ray instance per module, backends of a parametrised kind."""
from __future__ import annotations

import pytest

from colaft.backends import make_backend
from colaft.backends.ray_session import start_local


@pytest.fixture(scope="module")
def ray_session(tmp_path_factory):
    """One private Ray instance for a module's Ray tests, started as the backend starts its own."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))  # anything Ray writes to the home folder would show here
        local = start_local(tmp_path_factory.mktemp("ray"), num_cpus=4)
        yield home
        local.stop()


@pytest.fixture
def remote(request):
    """make(workers) -> a backend of the parametrised kind."""
    name = request.param
    if name == "ray":
        request.getfixturevalue("ray_session")
    made = []

    def make(workers: int):
        made.append(make_backend(name, workers=workers))
        return made[-1]
    yield make
    for backend in made:
        backend.close()
