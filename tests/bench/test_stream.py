"""`python -m colaft.bench.stream`: the smoke run writes both configurations (no timing asserted)."""
from __future__ import annotations

import json

from colaft.bench import stream


def test_stream_quick(tmp_path):
    stream.main(["--model", "tiny", "--device", "cpu", "--rounds", "1", "--in-flight", "2", "--out", str(tmp_path)])
    (result,) = json.loads((tmp_path / "stream.json").read_text())
    assert result["model"] == "tiny" and result["in_flight"] == 2
    assert set(result["seconds"]) == set(result["peak_mib"]) == {"ordinary", "streamed"}
