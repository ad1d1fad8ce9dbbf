"""IPC end to end: mailboxes, direct messages and topics over a real kernel daemon and
real ZeroMQ sockets, with programs in separate OS processes where it matters.

No test here generates text, so the kernel runs the ``sim`` driver (no model to load);
everything exercised is kernel mechanism: the mailbox bounds, who may message whom,
blocking and wake-ups, interruption by signals, and clean-up at exit.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmos.client import AsyncClient
from syscalls import errors, limits
from syscalls.errors import Errno, SyscallError
from tests.conftest import BARRIER_TOPIC, Parked, wait_until_async
from tests.kernels import Daemon

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    """A real kernel daemon on the simulator (overrides conftest's model-backed one)."""
    k = Daemon(tmp_path_factory.mktemp("ipc"), "--driver", "sim", "--slots", "1").start()
    yield k
    k.stop()


def fill(sender, pid: int) -> int:
    """Send small messages to ``pid`` until its mailbox is full; how many went in."""
    for i in range(limits.MAILBOX_MAX_MESSAGES):
        sender.send(pid, i)
    return limits.MAILBOX_MAX_MESSAGES


# -- two programs in separate OS processes ---------------------------------------------

PEER = textwrap.dedent("""
    import sys
    import llmos

    me = llmos.this_process()
    peer, role, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    for i in range(rounds):
        if role == "ping":
            me.send(peer, {"n": i, "text": f"ping {i}"})
            msg = me.recv(timeout=20, from_pid=peer)
            assert msg is not None and msg.body == {"n": i, "text": f"pong {i}"}, msg
        else:
            msg = me.recv(timeout=20, from_pid=peer)
            assert msg is not None and msg.body == {"n": i, "text": f"ping {i}"}, msg
            me.send(peer, {"n": i, "text": f"pong {i}"})
    print(role, "done", rounds)
""")


def run_peer(
    daemon, script: Path, proc, peer: int, role: str, rounds: int
) -> subprocess.Popen[str]:
    env = {
        **daemon.env,
        "LLMOS_PID": str(proc.pid),
        "LLMOS_TOKEN": proc.token,
        "LLMOS_ENDPOINT": daemon.endpoint,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.Popen(
        [sys.executable, str(script), str(peer), role, str(rounds)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_programs_in_separate_os_processes_exchange_messages_both_ways(daemon, spawn, tmp_path):
    parent = spawn("pinger")
    child = parent.spawn("ponger")
    script = tmp_path / "peer.py"
    script.write_text(PEER)
    pong = run_peer(daemon, script, child, parent.pid, "pong", 25)
    ping = run_peer(daemon, script, parent, child.pid, "ping", 25)
    outs = [p.communicate(timeout=120) for p in (ping, pong)]
    assert (ping.returncode, pong.returncode) == (0, 0), outs
    assert outs[0][0].strip() == "ping done 25" and outs[1][0].strip() == "pong done 25"


def test_unrelated_programs_talk_over_topics_but_not_directly(spawn):
    a, b = spawn("a"), spawn("b")
    with pytest.raises(errors.EPERM) as exc:
        a.send(b.pid, "hello")
    assert "topic" in exc.value.message
    a.subscribe("to-a")
    b.subscribe("to-b")
    assert a.publish("to-b", "question").delivered == 1
    q = b.recv(timeout=5)
    assert (q.body, q.sender, q.program, q.topic) == ("question", a.pid, a.pid, "to-b")
    assert b.publish("to-a", {"answer": 42}).delivered == 1
    assert a.recv(timeout=5).body == {"answer": 42}


# -- who may message whom ------------------------------------------------------------


def test_processes_of_one_program_message_each_other_and_the_admin_messages_anyone(admin, spawn):
    root = spawn("root")
    kid = root.spawn("kid")
    sib = root.spawn("sib")
    grandkid = kid.spawn("grandkid")
    for sender, receiver in [
        (root, grandkid),
        (grandkid, root),
        (kid, sib),
        (sib, kid),
        (root, root),
    ]:
        sender.send(receiver.pid, f"{sender.pid}->{receiver.pid}")
        msg = receiver.recv(timeout=5)
        assert (msg.body, msg.sender, msg.program) == (
            f"{sender.pid}->{receiver.pid}",
            sender.pid,
            root.pid,
        )
    admin.send(kid.pid, "from the admin")
    msg = kid.recv(timeout=5)
    assert (msg.body, msg.sender, msg.program, msg.topic) == ("from the admin", 0, 0, None)


def test_sending_to_an_exited_or_unknown_process_is_esrch_at_once(spawn):
    p = spawn()
    kid = p.spawn("kid")
    kid.exit(0)
    with pytest.raises(errors.ESRCH):
        p.send(kid.pid, "anyone there?")
    with pytest.raises(errors.ESRCH):
        p.send(2**31 - 1, "x")


# -- mailbox bounds ------------------------------------------------------------------


def test_a_full_mailbox_is_eagain_until_the_receiver_reads(spawn):
    sender = spawn()
    receiver = sender.spawn("receiver")
    assert fill(sender, receiver.pid) == limits.MAILBOX_MAX_MESSAGES
    with pytest.raises(errors.EAGAIN) as exc:
        sender.send(receiver.pid, "one too many")
    assert "full" in exc.value.message
    assert receiver.recv(timeout=0).body == 0
    assert sender.send(receiver.pid, "now it fits").queued == limits.MAILBOX_MAX_MESSAGES
    bodies = [receiver.recv(timeout=0).body for _ in range(limits.MAILBOX_MAX_MESSAGES)]
    assert bodies == [*range(1, limits.MAILBOX_MAX_MESSAGES), "now it fits"]
    assert receiver.recv(timeout=0) is None


def test_the_mailbox_is_bounded_in_bytes_too(spawn):
    sender = spawn()
    receiver = sender.spawn("receiver")
    big = "x" * 60_000  # 60,002 bytes as JSON: 17 fit in 1 MiB, the 18th does not
    for _ in range(limits.MAILBOX_MAX_BYTES // 60_002):
        sender.send(receiver.pid, big)
    with pytest.raises(errors.EAGAIN):
        sender.send(receiver.pid, big)
    sender.send(receiver.pid, "small still fits")
    assert receiver.recv_full(timeout=0).pending == limits.MAILBOX_MAX_BYTES // 60_002


def test_a_sender_with_a_timeout_waits_for_room_and_goes_on_when_the_receiver_reads(spawn):
    sender = spawn()
    receiver = sender.spawn("receiver")
    fill(sender, receiver.pid)
    blocked = Parked(sender, "ipc.send", {"pid": receiver.pid, "message": "patient", "timeout": 20})
    assert not blocked.done()  # it reached the kernel and waits there for room
    receiver.recv(timeout=0)
    assert blocked.result(timeout=10)["queued"] == limits.MAILBOX_MAX_MESSAGES


def test_a_sender_waiting_for_room_gives_up_with_eagain_at_its_timeout(spawn):
    sender = spawn()
    receiver = sender.spawn("receiver")
    fill(sender, receiver.pid)
    t0 = time.monotonic()
    with pytest.raises(errors.EAGAIN):
        sender.send(receiver.pid, "x", timeout=0.3)
    assert 0.25 < time.monotonic() - t0 < 5


def test_a_blocked_sender_is_woken_with_esrch_when_the_receiver_is_killed(admin, spawn):
    sender = spawn()
    receiver = sender.spawn("receiver")
    fill(sender, receiver.pid)
    blocked = Parked(sender, "ipc.send", {"pid": receiver.pid, "message": "x", "timeout": 60})
    assert not blocked.done()
    t0 = time.monotonic()
    admin.kill(receiver.pid, "KILL")
    with pytest.raises(errors.ESRCH) as exc:
        blocked.result(timeout=10)
    # woken while it waited (a send that only arrived after the kill hears "has exited")
    assert time.monotonic() - t0 < 5 and "while the message waited for room" in exc.value.message
    assert sender.getpid().pid == sender.pid  # the sender itself is fine


# -- receiving -----------------------------------------------------------------------


def test_recv_polls_with_timeout_zero_and_returns_none_when_the_timeout_passes(spawn):
    p = spawn()
    assert p.recv(timeout=0) is None
    t0 = time.monotonic()
    assert p.recv(timeout=0.3) is None
    assert 0.25 < time.monotonic() - t0 < 5


def test_recv_without_a_timeout_returns_none_at_the_calls_deadline(spawn):
    p = spawn()
    res = p.call("ipc.recv", {}, deadline_ms=300)
    assert res["message"] is None


def test_a_blocked_recv_wakes_when_a_message_arrives(spawn):
    parent = spawn()
    kid = parent.spawn("kid")
    waiting = Parked(kid, "ipc.recv", {"timeout": 20})
    assert not waiting.done()  # it waits in the kernel: the message below wakes it
    parent.send(kid.pid, ["wake", "up"])
    assert waiting.result(timeout=10)["message"]["body"] == ["wake", "up"]


def test_recv_filters_by_sender_and_topic_and_keeps_the_rest_in_order(admin, spawn):
    root = spawn()
    a, b = root.spawn("a"), root.spawn("b")
    root.subscribe("news")
    a.send(root.pid, "a1")
    b.send(root.pid, "b1")
    admin.publish("news", "n1")
    a.send(root.pid, "a2")
    assert root.recv(timeout=0, from_pid=b.pid).body == "b1"
    assert root.recv(timeout=0, topic="news").body == "n1"
    assert root.recv(timeout=0, topic="news") is None
    assert [root.recv(timeout=0).body for _ in range(2)] == ["a1", "a2"]


def test_a_receiver_killed_while_blocked_in_recv_is_interrupted_and_the_kernel_stays_healthy(
    admin, spawn
):
    p = spawn()
    kid = p.spawn("kid")
    waiting = Parked(kid, "ipc.recv", {"timeout": 60})
    assert not waiting.done()
    admin.kill(kid.pid, "KILL")
    with pytest.raises(errors.ECANCELED) as exc:
        waiting.result(timeout=10)
    assert "KILL" in exc.value.message
    with pytest.raises(errors.ESRCH):
        p.send(kid.pid, "too late")
    other = p.spawn("other")
    p.send(other.pid, "still working")
    assert other.recv(timeout=5).body == "still working"
    assert admin.info().processes >= 1


# -- topics --------------------------------------------------------------------------


def test_a_publisher_reaches_fifty_subscribers_each_in_publish_order(spawn):
    pub1, pub2 = spawn("pub1"), spawn("pub2")
    subs = [spawn(f"sub{i}") for i in range(50)]
    for s in subs:
        s.subscribe("fanout")
    for i in range(10):
        assert pub1.publish("fanout", {"from": 1, "n": i}).delivered == 50
        assert pub2.publish("fanout", {"from": 2, "n": i}).delivered == 50
    for s in subs:
        got = [s.recv(timeout=0) for _ in range(20)]
        assert s.recv(timeout=0) is None
        assert [g.body for g in got if g.sender == pub1.pid] == [
            {"from": 1, "n": i} for i in range(10)
        ]
        assert [g.body for g in got if g.sender == pub2.pid] == [
            {"from": 2, "n": i} for i in range(10)
        ]
        assert [g.id for g in got] == sorted(g.id for g in got)


def test_fifty_subscribers_blocked_in_recv_are_all_woken_by_one_publish(daemon):
    async def go() -> list[object]:
        async with AsyncClient(daemon.endpoint, pid=0, token=daemon.token) as c:
            subs = await asyncio.gather(*(c.spawn(f"asub{i}") for i in range(50)))
            pub = await c.spawn("apub")
            for s in subs:
                await s.subscribe("wakeup")
            waiting = [asyncio.ensure_future(s.recv(timeout=20)) for s in subs]
            # A barrier behind the 50 on the same socket (see tests.conftest.Parked): the
            # tasks send in the order they were made, so once it is answered the kernel has
            # started every recv, and a recv that had answered (with no message) would
            # show as None below rather than pass because the publish came first.
            await asyncio.ensure_future(pub.recv_full(timeout=0, topic=BARRIER_TOPIC))
            assert not any(w.done() for w in waiting)
            res = await pub.publish("wakeup", "go")
            got = await asyncio.gather(*waiting)
            for p in [*subs, pub]:
                await c.kill(p.pid, "KILL")
                await c.wait(p.pid, timeout=5)
            return [res.delivered, *(g.body for g in got)]

    assert asyncio.run(go()) == [50] + ["go"] * 50


def test_a_full_subscriber_misses_messages_and_counts_them_without_slowing_the_publisher(spawn):
    pub, slow, fast = spawn("pub"), spawn("slow"), spawn("fast")
    slow.subscribe("firehose")
    fast.subscribe("firehose")
    n = limits.MAILBOX_MAX_MESSAGES + 40
    t0 = time.monotonic()
    for i in range(n):
        res = pub.publish("firehose", i)
        assert res.delivered + res.dropped == 2
        assert fast.recv(timeout=0).body == i
    assert time.monotonic() - t0 < 60
    first = slow.recv_full(timeout=0)
    assert (first.message.body, first.dropped) == (0, 40)
    assert first.pending == limits.MAILBOX_MAX_MESSAGES - 1


def test_unsubscribe_stops_delivery_and_exit_removes_mailbox_and_subscriptions(admin, spawn):
    pub, sub = spawn("pub"), spawn("sub")
    sub.subscribe("t1")
    assert sub.subscribe("t2").subscriptions == 2
    assert sub.subscribe("t2").subscribers == 1  # subscribing again changes nothing
    assert sub.unsubscribe("t1").subscriptions == 1
    with pytest.raises(errors.ENOENT):
        sub.unsubscribe("t1")
    assert pub.publish("t1", "x").delivered == 0
    assert pub.publish("t2", "y").delivered == 1
    assert admin.ps(sub.pid)[0].mailbox == 1
    sub.exit(0)
    assert pub.publish("t2", "z").delivered == 0
    assert admin.ps(sub.pid)[0].mailbox == 0
    fresh = spawn("fresh")
    assert fresh.subscribe("t2").subscribers == 1


def test_subscriptions_per_process_are_limited(spawn):
    p = spawn()
    for i in range(limits.MAX_SUBSCRIPTIONS):
        p.subscribe(f"topic.{i}")
    with pytest.raises(errors.EAGAIN):
        p.subscribe("one.more")
    p.unsubscribe("topic.0")
    assert p.subscribe("one.more").subscriptions == limits.MAX_SUBSCRIPTIONS


# -- bad input -----------------------------------------------------------------------


def deep(levels: int) -> list:
    value: list = []
    for _ in range(levels - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "call,args,field",
    [
        ("ipc.send", {"pid": 2, "message": "x" * (limits.MAX_IPC_MESSAGE_BYTES + 1)}, "message"),
        ("ipc.send", {"pid": 2, "message": float("nan")}, "message"),
        ("ipc.send", {"pid": 2, "message": b"raw bytes"}, "message"),
        ("ipc.send", {"pid": 2, "message": deep(limits.MAX_IPC_DEPTH + 1)}, "message"),
        ("ipc.send", {"pid": "2", "message": "x"}, "pid"),
        ("ipc.send", {"pid": 2}, "message"),
        ("ipc.send", {"pid": 2, "message": "x", "urgent": True}, "urgent"),
        ("ipc.send", {"pid": 2, "message": "x", "timeout": -1}, "timeout"),
        ("ipc.recv", {"timeout": "soon"}, "timeout"),
        ("ipc.recv", {"from_pid": -1}, "from_pid"),
        ("ipc.subscribe", {"topic": "no spaces"}, "topic"),
        ("ipc.subscribe", {"topic": "x" * (limits.MAX_TOPIC_CHARS + 1)}, "topic"),
        ("ipc.publish", {"topic": "", "message": 1}, "topic"),
        (
            "ipc.publish",
            {"topic": "t", "message": {"k": "x" * limits.MAX_IPC_MESSAGE_BYTES}},
            "message",
        ),
    ],
)
def test_malformed_or_oversized_ipc_arguments_are_einval_naming_the_field(
    admin, spawn, call, args, field
):
    p = spawn()
    with pytest.raises(errors.EINVAL) as exc:
        p.call(call, args)
    assert field in exc.value.message
    assert admin.info().processes >= 1


def test_the_largest_message_passes_and_the_sdk_refuses_a_larger_one_before_sending(spawn):
    p = spawn()
    kid = p.spawn("kid")
    body = "x" * (limits.MAX_IPC_MESSAGE_BYTES - 2)  # exactly the limit with its quotes
    p.send(kid.pid, body)
    assert kid.recv(timeout=0).body == body
    with pytest.raises(errors.EINVAL) as exc:
        p.send(kid.pid, body + "x")
    assert str(limits.MAX_IPC_MESSAGE_BYTES) in exc.value.message
    p.send(kid.pid, None)  # JSON null is a message too
    assert kid.recv_full(timeout=0).message.body is None


def test_only_processes_receive_and_subscribe(admin):
    for call, args in [("ipc.recv", {}), ("ipc.subscribe", {"topic": "t"})]:
        with pytest.raises(errors.EACCES):
            admin.call(call, args)


# -- the mechanism in-process (kernel/ipc.py) -------------------------------------------


def test_all_mailboxes_together_are_bounded_and_their_bytes_accounted():
    from kernel.ipc import Ipc
    from kernel.process import INIT_PID, Caller, ProcessTable
    from kernel.quota import Limits

    table = ProcessTable(owner="t")
    root = table.spawn(INIT_PID, "root", "m", 0, None, None, Limits(max_ipc_bytes=1000))
    kids = [table.spawn(root.pid, f"k{i}", "m", 0, None) for i in range(3)]
    ipc, me = Ipc(table, max_bytes=1000), Caller(root.pid, root)

    async def go() -> None:
        far = asyncio.get_running_loop().time() + 5
        for kid in kids[:2]:
            await ipc.send(me, kid.pid, "x" * 398, 400, far)  # each mailbox far below its own bound
        with pytest.raises(SyscallError) as exc:
            await ipc.send(me, kids[2].pid, "x" * 398, 400, 0.0)
        assert exc.value.code is Errno.EAGAIN and "kernel's mailboxes" in exc.value.message
        ipc.subscribe(kids[2], "t")
        assert ipc.publish(me, "t", "x" * 398, 400)[1:] == (0, 1)  # dropped, not blocked
        msg, box = await ipc.recv(kids[0], None, None, far)
        assert msg is not None and ipc.bytes == 400 == sum(b.bytes for b in ipc.boxes.values())
        await ipc.send(me, kids[2].pid, "x" * 398, 400, far)
        ipc.close(kids[1].pid)
        assert ipc.bytes == 400 and kids[1].pid not in ipc.boxes
        ipc.close(kids[2].pid)
        assert ipc.bytes == 0 and ipc.topics == {}

    asyncio.run(go())


def test_a_recv_killed_in_the_same_batch_it_arrived_in_is_still_answered():
    """A kill dispatched before the victim's blocking call has started running must
    still answer that call (ECANCELED), not leave its caller waiting for the deadline."""
    from drivers.sim import SimDriver
    from kernel.kernel import Kernel
    from syscalls import codec

    async def go() -> list[dict]:
        k = Kernel({"sim": SimDriver()}, ["inproc://ipc-race"], embedder=None)
        sent: list[dict] = []
        k.dispatcher.send = lambda identity, frame: sent.append(codec.unpackb(frame))
        try:
            proc = k.procs.spawn(1, "victim", "sim", 0, None)
            # both frames in one transport batch: the recv's task has not run when the kill lands
            k.dispatcher.on_frames(
                [b"a", codec.encode_request(1, "ipc.recv", {"timeout": 30}, proc.pid, proc.token)]
            )
            k.dispatcher.on_frames(
                [
                    b"b",
                    codec.encode_request(
                        2, "proc.kill", {"pid": proc.pid, "signal": "KILL"}, 0, k.admin_token
                    ),
                ]
            )
            await wait_until_async(
                lambda: not k.dispatcher.calls and {r.get("id") for r in sent} >= {1, 2},
                timeout=5,
            )
        finally:
            await k.transport.close()  # its zmq context must not be left for the GC to terminate
            k.memory.close()
            await asyncio.to_thread(k.store.close)
        return sent

    replies = {r["id"]: r for r in asyncio.run(go())}
    assert replies[2]["ok"] is True
    assert replies[1]["ok"] is False and replies[1]["error"]["code"] == "ECANCELED"
