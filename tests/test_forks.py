"""Forks share history without copying it; any mix of forks and deletes keeps every
surviving conversation's history exactly what it was (checked against plain lists)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conversation_memory import Memory

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 50)),
        st.tuples(st.just("fork"), st.integers(0, 50), st.integers(-1, 60)),
        st.tuples(st.just("delete"), st.integers(0, 50)),
    ),
    max_size=40,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_forks_and_deletes_match_a_model(ops):
    with Memory(":memory:") as memory:
        root = memory.conversation()
        live = {root.id: (root, [])}
        counter = 0
        for op in ops:
            ids = sorted(live)
            if not ids:
                break
            conv, model = live[ids[op[1] % len(ids)]]
            if op[0] == "append":
                counter += 1
                message = {"role": "user", "content": f"m{counter}"}
                conv.append(message)
                model.append(message)
            elif op[0] == "fork":
                at = op[2] % (len(model) + 1) - 1  # -1 .. last
                child = conv.fork(at=at)
                live[child.id] = (child, model[: at + 1])
            else:
                conv.delete()
                del live[conv.id]
            for conv_id, (each, expected) in live.items():
                assert each.history() == expected, conv_id
                info = {c.id: c for c in memory.conversations()}[conv_id]
                assert info.message_count == len(expected)
                assert info.tokens == sum(e.tokens for e in each.entries())
                if expected:
                    assert each.context().messages[-1] == expected[-1]
