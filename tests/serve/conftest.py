"""Fixtures of the service's tests: one real `colaft serve` for the end-to-end tests of several modules.

The server (tiny Llama "llama" and tiny BERT "bert", users alice and bob) is started once per
test session (per xdist worker) when a test first asks for it; a module that needs a server
of its own settings defines its own `server` fixture, or starts one (serve_helpers.Server).
"""
from __future__ import annotations

import pytest
from serve_helpers import Server, add_user

from colaft.bench.postgres import Cluster


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    data = tmp_path_factory.mktemp("serve") / "data"
    keys = {name: add_user(data, name) for name in ("alice", "bob")}
    srv = Server(data, [f"llama={tiny_llama_dir}", f"bert={tiny_bert_dir}"], "--max-upload-mb", "0.25",
                 "--checkpoint-every", "4").start()
    srv.keys = keys
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def alice(server):
    return server.client(server.keys["alice"])


@pytest.fixture(scope="session")
def bob(server):
    return server.client(server.keys["bob"])


@pytest.fixture(scope="module")
def postgres():
    """A private PostgreSQL cluster for the module (colaft.bench.postgres); skipped without its binaries."""
    bin_dir = Cluster.find()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine: apt-get install postgresql")
    try:
        cluster = Cluster(bin_dir)
    except RuntimeError as e:
        pytest.skip(str(e))
    try:
        cluster.url = cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def postgres_url(postgres):
    """The URL of the database `colaft` on the module's cluster."""
    return postgres.url
