"""API keys (colaft.serve.auth), through the real server: no key, a wrong key or another scheme answers 401."""
from __future__ import annotations

import openai
import pytest


def test_missing_or_wrong_key_answers_401(server):
    for key in (None, "sk-colaft-wrong", server.keys["alice"] + "x"):
        with server.http(key) as h:
            for method, path in [("GET", "/v1/files"), ("GET", "/v1/fine_tuning/jobs"), ("GET", "/v1/models"),
                                 ("POST", "/v1/chat/completions")]:
                r = h.request(method, path, json={} if method == "POST" else None)
                assert r.status_code == 401, (key, path)
                assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        server.client("sk-colaft-nope").files.list()
    with server.http(None) as h:
        r = h.get("/v1/files", headers={"Authorization": f"Basic {server.keys['alice']}"})
        assert r.status_code == 401
