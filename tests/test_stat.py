"""sys.stat, the system state vector: models, process states, token rates, host.

The integration tests use the session's real kernel (real model, greedy, short); the
meters are also tested on their own.
"""

from __future__ import annotations

from collections import namedtuple

import pytest

from kernel.stats import HostMeter, RateMeter, _busy_percent
from llmos.client import Client
from syscalls import errors
from syscalls import models as m
from tests.conftest import GREEDY, InThread, wait_until

STATES = {"NEW", "READY", "RUNNING", "WAITING", "STOPPED", "ZOMBIE"}
LONG = "Count from one to one thousand:"


def counts_of(rows: list[m.ProcInfo]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for row in rows:
        counts[row.state] += 1
    return counts


# -- the meters on their own ------------------------------------------------------------


def test_rate_meter_averages_over_its_window_and_keeps_the_total():
    meter = RateMeter(window_s=10.0)
    t0 = meter.started
    meter.add(30, now=t0 + 20)
    meter.add(20, now=t0 + 25)
    meter.add(0, now=t0 + 25)  # nothing happened: not an event
    assert meter.rate(now=t0 + 26) == pytest.approx(5.0)
    assert meter.rate(now=t0 + 34) == pytest.approx(2.0)  # the first batch left the window
    assert meter.rate(now=t0 + 60) == 0.0 and meter.total == 50


def test_a_young_rate_meter_averages_over_its_life_not_the_whole_window():
    meter = RateMeter(window_s=10.0)
    meter.add(40, now=meter.started + 1.0)
    assert meter.rate(now=meter.started + 2.0) == pytest.approx(20.0)


def test_system_cpu_percent_is_the_busy_share_between_two_samples():
    Times = namedtuple("Times", "user nice system idle iowait guest guest_nice")
    before = Times(100, 0, 50, 800, 10, 0, 0)
    after = Times(160, 0, 70, 900, 30, 0, 0)  # 80 busy of 200 elapsed
    assert _busy_percent(before, after) == pytest.approx(40.0)
    assert _busy_percent(after, after) == 0.0


def test_host_meter_samples_without_blocking_and_within_bounds():
    meter = HostMeter()
    for _ in range(2):
        s = meter.sample()
        assert 0.0 <= s.cpu_percent <= 100.0 and 0.0 <= s.kernel_cpu_percent <= 100.0 * s.cpus
        assert 0 < s.mem_available <= s.mem_total and s.kernel_rss > 0 and len(s.load_avg) == 3


# -- against the real kernel --------------------------------------------------------------


@pytest.mark.model
def test_stat_describes_an_idle_kernel(admin: Client):
    s = admin.stat()
    assert s.uptime_s > 0 and s.policy
    (model,) = s.models
    assert (model.driver, model.state, model.busy, model.queued) == ("cpu", "ready", 0, 0)
    assert model.slots == 2 and model.memory_bytes is not None and model.memory_bytes > 10**8
    assert set(s.states) == STATES and s.states["RUNNING"] == s.states["READY"] == 0
    assert s.states == counts_of(s.procs)  # the admin's counts cover every row it sees
    assert {p.pid for p in s.procs} == {p.pid for p in admin.ps()}
    assert s.tokens.window_s > 0 and s.tokens.prompt_total >= 0 and s.tokens.output_total >= 0


@pytest.mark.model
def test_stat_without_rows_keeps_the_counts(admin: Client, spawn):
    spawn("counted")
    s = admin.stat(procs=False)
    assert s.procs == [] and s.states["NEW"] >= 1


@pytest.mark.model
def test_a_running_generation_shows_a_busy_slot_and_then_raises_the_token_rate(
    admin: Client, spawn
):
    before = admin.stat().tokens
    p = spawn("runner")
    gen = InThread(lambda: p.generate(prompt=LONG, max_tokens=4000, **GREEDY))
    snaps: list[m.StatResult] = []

    def running() -> bool:
        snaps.append(admin.stat())
        return snaps[-1].states["RUNNING"] == 1

    wait_until(running)
    during = snaps[-1]
    assert during.models[0].busy == 1 and during.models[0].queued == 0
    assert next(r for r in during.procs if r.pid == p.pid).state == "RUNNING"
    wait_until(lambda: admin.stat().tokens.output_total > before.output_total)  # tokens flow
    admin.kill(p.pid, "KILL")
    with pytest.raises(errors.ECANCELED):
        gen.result()
    after = admin.stat()
    assert after.tokens.output_total > before.output_total and after.tokens.output_tps > 0
    assert after.tokens.prompt_total > before.prompt_total and after.tokens.prompt_tps > 0
    assert after.models[0].busy == 0 and after.states["RUNNING"] == 0


@pytest.mark.model
def test_a_process_sees_only_its_own_subtree(admin: Client, spawn):
    parent = spawn("parent")
    kid = parent.spawn("kid")
    grandkid = kid.spawn("grandkid")
    stranger = spawn("stranger")
    mine = parent.stat()
    assert [r.pid for r in mine.procs] == [parent.pid, kid.pid, grandkid.pid]
    assert sum(mine.states.values()) == 3 and mine.states == counts_of(mine.procs)
    assert [r.pid for r in kid.stat().procs] == [kid.pid, grandkid.pid]
    everything = {r.pid for r in admin.stat().procs}
    assert {parent.pid, kid.pid, grandkid.pid, stranger.pid} <= everything
    # models, rates and host are kernel-wide, whoever asks
    assert mine.models[0].slots == 2 and mine.host.cpus >= 1


@pytest.mark.model
def test_host_figures_are_sane(admin: Client):
    first, second = admin.stat().host, admin.stat().host
    for h in (first, second):
        assert 0.0 <= h.cpu_percent <= 100.0
        assert 0.0 <= h.kernel_cpu_percent <= 100.0 * h.cpus
        assert 0 < h.mem_available <= h.mem_total
        assert h.kernel_rss > 0 and h.kernel_cpu_s > 0 and len(h.load_avg) == 3
    assert second.kernel_cpu_s >= first.kernel_cpu_s


@pytest.mark.model
def test_stat_rejects_bad_arguments_with_einval(admin: Client):
    with pytest.raises(errors.EINVAL):
        admin.call("sys.stat", {"procs": "yes"})
    with pytest.raises(errors.EINVAL):
        admin.call("sys.stat", {"pid": 3})
