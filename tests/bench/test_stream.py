"""`colaft bench stream`: the smoke run writes both configurations (no timing asserted)."""
from __future__ import annotations

import json

from colaft.bench import stream


def test_stream_quick(tmp_path):
    stream.main(["tiny"], "cpu", "float32", rounds=1, in_flight=2, batch=None, out=tmp_path)
    (result,) = json.loads((tmp_path / "stream.json").read_text())
    assert result["model"] == "tiny" and result["in_flight"] == 2
    assert set(result["seconds"]) == set(result["peak_mib"]) == {"ordinary", "streamed"}
