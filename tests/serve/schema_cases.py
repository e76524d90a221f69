"""Cases drawn from the service's own /openapi.json (schemathesis), made to reach deep: real
values mixed into the generated bodies, and values that only make a valid request slow capped.
Shared by the fuzz test (no 5xx) and the schema test (every answer as documented)."""
from __future__ import annotations

from hypothesis import strategies as st

PAIRS = "model+training_file"
"""The key of body values drawn together (each a dict of fields)."""


def with_real_values(strategy, values: dict, slow: dict):
    """Cases of `strategy` with, for each body field present, either the generated value or one of
    `values` (a PAIRS value's fields, when all are present, replaced together or not at all), and
    the numbers of `slow` (field -> cap) in the body or query capped."""

    @st.composite
    def cases(draw):
        case = draw(strategy)
        if isinstance(case.body, dict):
            for name, choices in values.items():
                if name == PAIRS:
                    pair = draw(st.sampled_from(choices))
                    if pair.keys() <= case.body.keys() and draw(st.booleans()):
                        case.body.update(pair)
                elif name in case.body and draw(st.booleans()):
                    case.body[name] = draw(st.sampled_from(choices))
        for part in (case.body, case.query):
            if isinstance(part, dict):
                for name, cap in slow.items():
                    value = part.get(name)
                    if isinstance(value, int | float) and not isinstance(value, bool) and value > cap:
                        part[name] = cap
        return case

    return cases()
