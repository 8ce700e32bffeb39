"""The preview admits a session only if the CPU can carry it in real time: (sessions + 1) x the cost of
one session must fit in `cpu_capacity` of the cores; otherwise `busy` with a retry hint."""

from __future__ import annotations

import asyncio

import pytest
from server_peer import PeerClient, offer_reply

from server import cpu as cpu_module
from server.admission import Busy
from server.cpu import PRIOR_COST, CpuBudget


def test_the_cost_of_a_session_is_measured_from_the_process_cpu_time() -> None:
    now, used = [0.0], [0.0]
    budget = CpuBudget(capacity=0.9, cores=2, cpu_time=lambda: used[0], clock=lambda: now[0])
    assert budget.cost() == PRIOR_COST  # nothing measured yet
    now[0], used[0] = 1.0, 1.6  # two sessions took 1.6 cores for a second
    budget.sample(sessions=2)
    assert budget.cost() == pytest.approx(0.8)
    budget.check(admitted=1)  # 2 x 0.8 = 1.6 <= 0.9 x 2
    with pytest.raises(Busy):
        budget.check(admitted=2)  # 3 x 0.8 = 2.4 > 1.8


def test_a_configured_cost_replaces_the_measurement_and_the_first_session_always_gets_in() -> None:
    budget = CpuBudget(capacity=1.0, cost=3.0, cores=2)
    budget.check(admitted=0)  # one session, even one that costs more than the machine has
    with pytest.raises(Busy) as refused:
        budget.check(admitted=1)
    assert refused.value.retry_s > 0 and "cannot carry 2 preview sessions" in refused.value.message
    CpuBudget(capacity=0, cost=3.0, cores=2).check(admitted=5)  # capacity 0: no check


async def test_a_preview_session_the_cpu_cannot_carry_gets_busy_with_a_retry_hint(start_server, monkeypatch) -> None:
    monkeypatch.setattr(cpu_module.os, "cpu_count", lambda: 2)
    app = await start_server(cpu_capacity=1.0, cpu_session_cost=0.8)  # 2 cores: two sessions fit, three do not
    url = app.url.replace("http", "ws") + "ws"
    first, second, third = [await PeerClient(url, keep_video=False).connect() for _ in range(3)]
    try:
        await first.start(mode="push")
        await second.start(mode="push")
        await asyncio.gather(first.wait_frames(3), second.wait_frames(3))  # connected: not pending any more
        refused = await offer_reply(third)
        assert refused["code"] == "busy" and refused["retryAfterS"] == 30, refused
        assert "cannot carry 3 preview sessions" in refused["message"]
        assert len(app.registry) == 2
        await first.close()
        for _ in range(100):
            if app.admission.sessions < 2:
                break
            await asyncio.sleep(0.05)
        assert (await offer_reply(third))["type"] == "answer"  # a place freed up
    finally:
        for client in (first, second, third):
            await client.close()
