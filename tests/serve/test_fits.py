"""The server's side of a client-fit job (colaft.serve.fits.Channel), without a server: messages
and their fit points, pulls (long polls) and resyncs, updates accepted once and in order,
the staleness bound, a client seen or gone, idleness, and the end of the job."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from colaft.packets import Packet, packets_from_bytes
from colaft.serve.fits import Channel, Refused


def state(version: int = 0, **adapters) -> dict:
    """An owner's state as a client pushes it: one site "s" with a 2x2 weight unless `adapters` says otherwise."""
    return {"adapters": adapters or {"s": {"w": torch.zeros(2, 2)}}, "optimizer": {}, "scheduler": {},
            "version": version, "pending": [], "pending_steps": 0}


def channel(interval: int = 1, staleness: int = 0, woken: list | None = None) -> Channel:
    return Channel("job", interval=interval, staleness=staleness, state=state(), seq=0, info={},
                   wake=lambda: woken.append(1) if woken is not None else None)


def pull(ch: Channel, after: int, wait: float = 0.0, **kw):
    """The API's long poll (`Channel.poll`), run to its end."""
    return asyncio.run(ch.poll(after, wait, **kw))


def pulled(ch: Channel, after: int, **kw) -> list[tuple[int, str, bool]]:
    messages, over = pull(ch, after, wait=0, **kw)
    assert not over
    return [(m.seq, m.kind, m.ends_fit) for m in messages]


def test_channel_gates_the_job_on_its_fits_in_flight():
    """The engine's view without a server: S = 1, I = 2; an accepted update counts as in flight
    until the engine takes it; a client at a version the server does not hold must resync."""
    state = {"adapters": {"s": {"w": torch.zeros(2, 2)}}, "optimizer": {}, "scheduler": {}, "version": 0,
             "pending": [], "pending_steps": 0}
    woken = []
    ch = Channel("job", interval=2, staleness=1, state=state, seq=0, info={}, wake=lambda: woken.append(1))
    assert ch.runnable(60)
    ch.offer("push", [])
    ch.offer("push", [])  # message 2 ends a fit
    assert ch.fits_in_flight() == 1 and ch.runnable(60)
    ch.offer("push", [])
    ch.offer("push", [])  # a second fit in flight: past S = 1
    assert ch.fits_in_flight() == 2 and not ch.runnable(60)
    with pytest.raises(Refused, match="fetch fit/state"):
        pull(ch, after=4, wait=0, version=3)  # e.g. the server went back to a checkpoint
    with pytest.raises(Refused) as e:
        ch.push(1, 4, {**state, "version": 1}, False)  # message 2 is the next fit, not 4
    assert e.value.code == "unexpected_update"
    ch.push(1, 2, {**state, "version": 1}, False)
    assert woken and ch.fits_in_flight() == 2  # accepted, not yet applied by the engine
    assert [a.version for a in ch.take_updates()] == [1] and ch.fits_in_flight() == 1 and ch.runnable(60)
    assert [m.seq for m in pull(ch, after=2, wait=0, version=1)[0]] == [3, 4]
    assert not ch.runnable(-1)  # its client not seen within the timeout: the job waits


def test_every_interval_th_push_and_a_flush_of_pending_pushes_end_a_fit():
    ch = channel(interval=3)
    for _ in range(4):
        ch.offer("push", [])
    assert ch.pending_steps == 1 and ch.fits_in_flight() == 1
    ch.offer("flush", [])  # the job's end: the partial interval is fitted
    ch.offer("flush", [])  # nothing pending: no fit
    assert pulled(ch, 0) == [(1, "push", False), (2, "push", False), (3, "push", True), (4, "push", False),
                             (5, "flush", True), (6, "flush", False)]
    assert ch.pending_steps == 0 and ch.fits_in_flight() == 2 and ch.sent == 6


def test_an_update_is_accepted_once_and_in_order():
    woken = []
    ch = channel(interval=1, staleness=2, woken=woken)
    ch.offer("push", [])
    ch.offer("push", [])
    ch.push(1, 1, state(1), skipped=False)
    assert (ch.version, ch.acked, woken) == (1, 1, [1])
    assert pulled(ch, 1) == [(2, "push", True)]  # message 1 is covered by the snapshot: dropped
    refused = [(1, 1, state(1), "duplicate_update"),  # the same update again
               (0, 1, state(0), "duplicate_update"),  # an older one
               (3, 2, state(3), "unexpected_update"),  # a version skipped
               (2, 1, state(2), "unexpected_update"),  # message 2 is the one to answer
               (2, 2, state(5), "unexpected_update"),  # the state is not at the version it claims
               (2, 2, state(2, t={"w": torch.zeros(2, 2)}), "invalid_update"),  # another site
               (2, 2, state(2, s={"w": torch.zeros(2, 3)}), "invalid_update"),  # another shape
               (2, 2, state(2, s={"w": torch.zeros(2, 2, dtype=torch.long)}), "invalid_update"),  # not floating
               (2, 2, state(2, s={"w": torch.full((2, 2), float("nan"))}), "non_finite_update"),
               (2, 2, state(2, s={"w": torch.tensor([[0.0, float("inf")], [0.0, 0.0]])}), "non_finite_update"),
               (2, 2, {**state(2), "optimizer": {"state": {"0": {"exp_avg": torch.tensor([float("-inf")])}}}},
                "non_finite_update")]
    for version, seq, pushed, code in refused:
        with pytest.raises(Refused) as e:
            ch.push(version, seq, pushed, skipped=False)
        assert e.value.code == code, (version, seq)
    assert (ch.version, ch.acked, woken) == (1, 1, [1])  # nothing refused changed anything
    with pytest.raises(Refused) as e:
        ch.push(2, 2, state(2, s={"w": torch.full((2, 2), float("nan"))}), skipped=False)
    assert (e.value.status, e.value.param) == (400, "body") and "adapters.s.w holds NaN or Inf" in str(e.value)
    ch.push(2, 2, state(2), skipped=True)  # the owner skipped its fit (non-finite packets)
    accepted = ch.take_updates()
    assert [(a.version, a.seq) for a in accepted] == [(1, 1), (2, 2)]
    assert accepted[0].states is not None and accepted[1].states is None  # nothing to load for a skipped fit
    assert ch.take_updates() == [] and ch.state["version"] == 2


def test_a_pull_answers_the_messages_after_its_seq_or_asks_for_a_resync():
    ch = channel(interval=2)
    for _ in range(3):
        ch.offer("push", [])
    assert [seq for seq, *_ in pulled(ch, 1)] == [2, 3] and pulled(ch, 3) == []
    ch.push(1, 2, state(1), skipped=False)
    for after, version in [(1, None),  # before the snapshot: those messages are gone
                           (4, None),  # past what was sent
                           (2, 0)]:  # the client is at a version the server does not hold
        with pytest.raises(Refused) as e:
            pull(ch, after, wait=0, version=version)
        assert e.value.code == "resync", (after, version)
    assert [seq for seq, *_ in pulled(ch, 2, version=1)] == [3]
    start = time.monotonic()
    assert pull(ch, 3, wait=0.2) == ([], False) and time.monotonic() - start >= 0.2  # nothing new: waited
    threading.Timer(0.1, ch.offer, ("push", [])).start()
    messages, over = pull(ch, 3, wait=30)  # woken by the new message, long before its wait ends
    assert [m.seq for m in messages] == [4] and not over


def test_fits_in_flight_count_until_the_engine_takes_their_updates():
    ch = channel(interval=1, staleness=0)
    assert ch.runnable(60)
    ch.offer("push", [])
    assert ch.fits_in_flight() == 1 and not ch.runnable(60)  # S = 0: the next step waits for this fit
    ch.push(1, 1, state(1), skipped=False)
    assert ch.fits_in_flight() == 1 and not ch.runnable(60)  # accepted, not yet applied
    ch.take_updates()
    assert ch.fits_in_flight() == 0 and ch.runnable(60)


def test_a_client_counts_as_gone_when_not_seen_within_the_timeout():
    ch = channel()
    assert not ch.connected and not ch.gone(60)  # admission counts as seen
    ch.last_seen -= 100
    assert ch.gone(60) and not ch.runnable(60)
    pull(ch, 0, wait=0)
    assert ch.connected and not ch.gone(60) and ch.runnable(60)
    ch.offer("push", [])
    ch.last_seen -= 100
    ch.push(1, 1, state(1), skipped=False)  # a push is a sign of life too
    assert not ch.gone(60)


def test_idle_once_every_message_is_answered_and_every_update_taken():
    ch = channel(interval=2)
    assert ch.idle()
    ch.offer("push", [])
    assert not ch.idle()  # a push the owner has not fitted yet
    ch.offer("push", [])
    ch.push(1, 2, state(1), skipped=False)
    assert not ch.idle()  # answered, not yet applied
    ch.take_updates()
    assert ch.idle()


def test_a_closed_channel_ends_the_polls_and_takes_no_update():
    ch = channel()
    ch.offer("push", [])
    threading.Timer(0.1, ch.close, ("cancelled",)).start()
    assert pull(ch, 1, wait=30) == ([], True)  # a waiting poll returns when the job ends
    assert pull(ch, 0, wait=0) == ([], True) and ch.final == "cancelled"
    with pytest.raises(Refused) as e:
        ch.push(1, 1, state(1), skipped=False)
    assert e.value.code == "job_finished" and ch.version == 0


def test_a_pull_body_holds_its_messages_packets_and_is_made_once():
    packets = [Packet("s", torch.randn(3, 2), torch.randn(3, 2), "job") for _ in range(3)]
    ch = channel(interval=2)
    ch.offer("push", packets[:2])
    ch.offer("push", packets[2:])
    messages, _ = pull(ch, 0, wait=0)
    body = ch.body(messages)
    got = packets_from_bytes(body)
    assert [p.site for p in got] == ["s"] * 3
    assert all(torch.equal(a.x, b.x) and torch.equal(a.grad, b.grad) for a, b in zip(got, packets))
    assert ch.body(pull(ch, 0, wait=0)[0]) is body  # a retried pull gets the same bytes, not serialised again
    assert packets_from_bytes(ch.body(messages[1:])) and ch.body(messages) is not body  # only the last is kept


def test_the_channel_knows_its_adapters_size_and_an_update_is_capped_by_it():
    from colaft.serve.routes.fit import update_limit
    small = channel()
    big = Channel("job", interval=1, staleness=0, state=state(s={"a": torch.zeros(64, 8), "b": torch.zeros(8, 64)},
                                                              t={"w": torch.zeros(3)}),
                  seq=0, info={}, wake=lambda: None)
    assert small.elements == 4 and big.elements == 64 * 8 * 2 + 3
    # an update after a fit (adapters and Adam's moments, float32) fits; ten times the adapters does not
    assert 3 * 4 * big.elements + (1 << 16) < update_limit(big.elements) < 10 * 8 * big.elements + (1 << 20)
    assert update_limit(big.elements) - update_limit(small.elements) == 32 * (big.elements - small.elements)


def test_a_poll_is_woken_from_the_engines_thread_holds_no_thread_and_leaves_nothing_when_cancelled():
    """`poll`, the coroutine the API awaits: many polls wait in one thread, each woken through the
    loop by a message offered from another thread (the engine's), or by the job's end."""
    import asyncio

    ch = channel()
    ch.offer("push", [])

    async def main():
        threads = threading.active_count()
        polls = [asyncio.create_task(ch.poll(1, wait=30)) for _ in range(50)]
        while len(ch._waiters) < 50:
            await asyncio.sleep(0.01)
        assert threading.active_count() == threads  # fifty waiting polls, no thread more
        await asyncio.to_thread(ch.offer, "push", [])  # from another thread, as the engine does
        answers = await asyncio.gather(*polls)
        assert all([m.seq for m in messages] == [2] and not over for messages, over in answers)
        assert not ch._waiters
        assert await ch.poll(2, wait=0.05) == ([], False)  # nothing new: waited, then nothing
        cancelled = asyncio.create_task(ch.poll(2, wait=30))
        await asyncio.sleep(0.05)
        cancelled.cancel()  # its client went away
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert not ch._waiters
        with pytest.raises(Refused):
            await ch.poll(0, wait=0, version=5)
        ending = asyncio.create_task(ch.poll(2, wait=30))
        await asyncio.sleep(0.05)
        await asyncio.to_thread(ch.close, "cancelled")
        assert await ending == ([], True)

    asyncio.run(main())
