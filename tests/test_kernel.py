"""The kernel daemon end to end: real ZeroMQ, real driver, real packaged model.

Generations are greedy and short; assertions are about structure, limits,
determinism, process semantics and isolation, not answer quality.
"""

from __future__ import annotations

import msgpack
import pytest
import zmq

from llmos.client import AsyncClient, Client
from syscalls import codec, errors, limits
from syscalls.errors import Errno, SyscallError
from tests.conftest import GREEDY, InThread, wait_until

pytestmark = pytest.mark.model

USER = [{"role": "user", "content": "What is the capital of France?"}]


def state(admin: Client, pid: int) -> str:
    return admin.ps(pid)[0].state


def model_row(admin: Client):
    return admin.info().models[0]


# -- spawn / generate / context ------------------------------------------------------


def test_spawn_returns_a_pid_and_secret_token_and_ps_lists_the_process(admin, spawn):
    p = spawn("worker", system="Be brief.", nice=3)
    assert p.pid > 1 and len(p.token) >= 24
    row = admin.ps(p.pid)[0]
    assert (row.name, row.ppid, row.state, row.nice, row.context_messages) == (
        "worker",
        1,
        "NEW",
        3,
        1,
    )
    assert p.getpid().pid == p.pid


def test_greedy_generation_is_deterministic_and_reports_usage(spawn):
    a, b = spawn(), spawn()
    ra = a.generate(USER, max_tokens=12, **GREEDY)
    rb = b.generate(USER, max_tokens=12, **GREEDY)
    assert ra.text == rb.text and ra.text.strip()
    assert ra.finish_reason in ("stop", "length")
    assert ra.usage.prompt_tokens > 5 and 0 < ra.usage.output_tokens <= 12


def test_streamed_chunks_concatenate_to_the_whole_answer(spawn):
    whole = spawn().generate(USER, max_tokens=12, **GREEDY)
    s = spawn()
    chunks = list(s.stream(USER[0]["content"], max_tokens=12, **GREEDY))
    assert len(chunks) > 1 and "".join(chunks) == whole.text == s.last.text
    assert s.last.usage == whole.usage


def test_the_context_keeps_a_multi_turn_conversation(spawn):
    p = spawn(system="You are a geography tutor.")
    first = p.generate(USER, max_tokens=10, **GREEDY)
    second = p.generate([{"role": "user", "content": "And of Italy?"}], max_tokens=10, **GREEDY)
    ctx = p.context()
    assert [m["role"] for m in ctx] == ["system", "user", "assistant", "user", "assistant"]
    assert ctx[2]["content"] == first.text and ctx[4]["content"] == second.text
    # the second turn was generated with the whole conversation as its prompt
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.output_tokens


def test_a_raw_prompt_neither_uses_nor_changes_the_context(spawn):
    p = spawn(system="sys")
    r = p.generate(prompt="The capital of France is", max_tokens=5, **GREEDY)
    assert r.text and p.context() == [{"role": "system", "content": "sys"}]


def test_max_tokens_and_stop_strings_end_generation(spawn):
    p = spawn()
    r = p.generate(prompt="1, 2, 3, 4,", max_tokens=3, **GREEDY)
    assert r.finish_reason == "length" and r.usage.output_tokens == 3
    full = spawn().generate(prompt="1, 2, 3, 4,", max_tokens=12, **GREEDY).text
    cut = full.strip()[:1]
    stopped = spawn().generate(prompt="1, 2, 3, 4,", max_tokens=12, stop=[cut], **GREEDY)
    assert stopped.finish_reason == "stop" and cut not in stopped.text


def test_seeded_sampling_is_reproducible(spawn):
    opts = {"temperature": 1.0, "seed": 1234, "max_tokens": 10}
    assert spawn().generate(USER, **opts).text == spawn().generate(USER, **opts).text


def test_ctx_append_get_and_clear(spawn):
    p = spawn(system="sys")
    assert p.append([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == 3
    assert p.context(last=1) == [{"role": "assistant", "content": "b"}]
    assert p.clear() == 1 and p.context() == [{"role": "system", "content": "sys"}]
    assert p.clear(keep_system=False) == 0


def test_a_prompt_larger_than_the_window_is_e2big_and_changes_nothing(spawn, admin):
    p = spawn()
    window = model_row(admin).max_context
    big = "word " * (window + 10)
    with pytest.raises(errors.E2BIG) as exc:
        p.generate([{"role": "user", "content": big}], max_tokens=4)
    assert str(window) in exc.value.message
    assert p.context() == []


# -- processes: nice, wait, exit, kill, stop ----------------------------------------


def test_nice_may_lower_but_never_raise_above_the_caller(admin, spawn):
    parent = spawn(nice=5)
    child = parent.spawn("kid", nice=5)
    assert parent.nice(10, pid=child.pid).nice == 10
    with pytest.raises(errors.EPERM):
        parent.nice(0, pid=child.pid)
    with pytest.raises(errors.EPERM):
        parent.spawn("greedy-kid", nice=0)
    assert admin.nice(child.pid, -5).nice == -5  # the admin may


def test_wait_returns_the_exit_status_and_reaps_the_zombie(admin, spawn):
    parent = spawn()
    child = parent.spawn("kid")
    child.exit(42)
    assert state(admin, child.pid) == "ZOMBIE"
    res = parent.wait(child.pid, timeout=5)
    assert (res.pid, res.exit_status, res.signal) == (child.pid, 42, None)
    assert all(p.pid != child.pid for p in admin.ps())
    with pytest.raises(errors.ECHILD):
        parent.wait(timeout=0)


def test_wait_blocks_until_the_child_exits(spawn):
    parent = spawn()
    child = parent.spawn("kid")
    waiting = InThread(lambda: parent.wait(timeout=30))
    with pytest.raises(errors.ETIMEDOUT):
        parent.client.__class__(parent.client.endpoint, pid=parent.pid, token=parent.token).call(
            "proc.wait", {"timeout": 0.05}
        )
    assert not waiting.done()
    child.kill(signal="TERM")
    res = waiting.result()
    assert res.pid == child.pid and res.signal == "TERM" and res.exit_status == 143


def test_orphans_are_reparented_to_init_and_reaped_when_they_exit(admin, spawn):
    parent = spawn()
    child = parent.spawn("kid")
    grandchild = child.spawn("grandkid")
    child.exit(0)
    assert admin.ps(grandchild.pid)[0].ppid == 1
    grandchild.exit(0)
    assert all(p.pid != grandchild.pid for p in admin.ps())


def test_an_exited_process_can_make_no_more_syscalls(spawn):
    p = spawn()
    p.exit(0)
    with pytest.raises(errors.EACCES):
        p.getpid()


def test_kill_during_generation_answers_the_caller_at_once_and_frees_the_slot(admin, spawn):
    p = spawn()
    gen = InThread(
        lambda: p.generate(prompt="Count from one to one thousand:", max_tokens=4000, **GREEDY)
    )
    wait_until(lambda: state(admin, p.pid) == "RUNNING" and admin.ps(p.pid)[0].output_tokens == 0)
    wait_until(lambda: model_row(admin).busy == 1)
    admin.kill(p.pid, "KILL")
    with pytest.raises(errors.ECANCELED) as exc:
        gen.result(timeout=30)
    assert "KILL" in exc.value.message
    assert model_row(admin).busy == 0
    row = admin.ps(p.pid)[0]
    assert (row.state, row.signal, row.exit_status) == ("ZOMBIE", "KILL", 137)


def test_stop_releases_the_slot_and_cont_resumes_to_the_same_text(admin, spawn):
    prompt = "List the days of the week:"
    reference = spawn().generate(prompt=prompt, max_tokens=40, **GREEDY)
    p = spawn()
    gen = InThread(lambda: p.generate(prompt=prompt, max_tokens=40, **GREEDY))
    wait_until(lambda: state(admin, p.pid) == "RUNNING")
    admin.kill(p.pid, "STOP")
    wait_until(lambda: model_row(admin).busy == 0)
    assert state(admin, p.pid) == "STOPPED" and not gen.done()
    admin.kill(p.pid, "CONT")
    res = gen.result()
    assert res.text == reference.text and res.usage.output_tokens == reference.usage.output_tokens
    assert state(admin, p.pid) == "WAITING"


def test_term_lets_the_current_generation_finish_then_exits(admin, spawn):
    p = spawn()
    gen = InThread(lambda: p.generate(prompt="Hello", max_tokens=12, **GREEDY))
    wait_until(lambda: state(admin, p.pid) in ("RUNNING", "READY"))
    admin.kill(p.pid, "TERM")
    res = gen.result()
    assert res.text
    row = admin.ps(p.pid)[0]
    assert (row.state, row.signal, row.exit_status) == ("ZOMBIE", "TERM", 143)


def test_a_deadline_ends_a_generation_with_etimedout_and_changes_nothing(admin, spawn):
    p = spawn()
    with pytest.raises(errors.ETIMEDOUT):
        p.generate(USER, max_tokens=4000, deadline_ms=300, **GREEDY)
    assert p.context() == [] and model_row(admin).busy == 0
    assert state(admin, p.pid) == "WAITING"


def test_one_generation_at_a_time_per_process(admin, spawn):
    p = spawn()
    gen = InThread(lambda: p.generate(prompt="Hello", max_tokens=30, **GREEDY))
    wait_until(lambda: admin.ps(p.pid)[0].generate_calls == 1)
    other = Client(p.client.endpoint, pid=p.pid, token=p.token)
    with pytest.raises(errors.EBUSY):
        other.call("llm.generate", {"prompt": "again", "max_tokens": 2})
    gen.result()


def test_a_long_generation_does_not_stall_other_callers(admin, spawn):
    p = spawn()
    gen = InThread(lambda: p.generate(prompt="Tell a long story:", max_tokens=200, **GREEDY))
    wait_until(lambda: state(admin, p.pid) == "RUNNING")
    q = spawn()
    for _ in range(50):
        q.getpid()
        q.context()
    assert not gen.done()  # 100 syscalls answered while the model was busy
    admin.kill(p.pid, "KILL")
    with pytest.raises(errors.ECANCELED):
        gen.result()


# -- isolation and credentials -------------------------------------------------------


def test_processes_cannot_touch_each_other(admin, spawn):
    a, b = spawn("a"), spawn("b")
    b.append([{"role": "user", "content": "b's secret"}])
    for call, args in [
        ("ctx.get", {"pid": b.pid}),
        ("ctx.clear", {"pid": b.pid}),
        ("proc.kill", {"pid": b.pid, "signal": "KILL"}),
        ("proc.nice", {"pid": b.pid, "nice": 19}),
        ("proc.ps", {"pid": b.pid}),
    ]:
        with pytest.raises(errors.EPERM):
            a.call(call, args)
    assert [p.pid for p in a.ps()] == [a.pid]
    with pytest.raises(errors.EACCES):
        Client(a.client.endpoint, pid=b.pid, token=a.token).call("ctx.get")
    assert b.context() == [{"role": "user", "content": "b's secret"}]


def test_a_parent_acts_on_its_descendants(spawn):
    parent = spawn()
    child = parent.spawn("kid")
    grandchild = child.spawn("grandkid")
    grandchild.append([{"role": "user", "content": "hi"}])
    assert parent.call("ctx.get", {"pid": grandchild.pid})["total"] == 1
    assert {p.pid for p in parent.ps()} == {parent.pid, child.pid, grandchild.pid}
    with pytest.raises(errors.EPERM):
        grandchild.kill(pid=parent.pid)


def test_the_admin_needs_the_token_and_a_process_to_generate(daemon):
    with pytest.raises(errors.EACCES):
        Client(daemon.endpoint, pid=0, token="wrong").info()
    with daemon.admin() as c, pytest.raises(errors.EACCES):
        c.call("llm.generate", {"prompt": "hi"})


def test_spawning_on_an_unknown_model_is_enoent(admin):
    with pytest.raises(errors.ENOENT):
        admin.spawn("x", model="no-such-model")


# -- hostile input over the real socket -----------------------------------------------


def raw_exchange(endpoint: str, *parts: bytes, timeout_ms: int = 5000) -> dict | None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(list(parts))
        if not sock.poll(timeout_ms):
            return None
        return msgpack.unpackb(sock.recv())
    finally:
        sock.close()


def good(**over) -> bytes:
    frame = {
        "v": limits.ABI_VERSION,
        "id": 5,
        "call": "sys.info",
        "pid": 0,
        "token": "",
        "args": {},
    }
    frame.update(over)
    return msgpack.packb(frame)


@pytest.mark.parametrize(
    "frame,code",
    [
        (b"\xc1garbage", Errno.EPROTO),
        (good()[:-3], Errno.EPROTO),
        (msgpack.packb([1, 2]), Errno.EPROTO),
        (good(v=2), Errno.EPROTONOSUPPORT),
        (good(call="proc.fly"), Errno.ENOSYS),
        (good(id="x"), Errno.EPROTO),
        (good(args={"name": 7}, call="proc.spawn"), Errno.EACCES),
        (b"\x00" * (limits.MAX_FRAME_BYTES + 10), Errno.E2BIG),
    ],
)
def test_malformed_frames_get_the_right_error_and_the_kernel_keeps_serving(
    daemon, admin, frame, code
):
    reply = raw_exchange(daemon.endpoint, frame)
    assert reply is not None and reply["ok"] is False and reply["error"]["code"] == code
    assert reply["error"]["message"]
    assert admin.info().abi == limits.ABI_VERSION


def test_invalid_arguments_name_the_field(daemon, admin):
    frame = good(call="proc.spawn", token=daemon.token, args={"name": "ok", "nice": "high"})
    reply = raw_exchange(daemon.endpoint, frame)
    assert (
        reply["id"] == 5
        and reply["error"]["code"] == "EINVAL"
        and "nice" in reply["error"]["message"]
    )


def test_multipart_requests_are_refused(daemon):
    reply = raw_exchange(daemon.endpoint, good(), good())
    assert reply["error"]["code"] == "EPROTO"


def test_a_frame_over_the_transport_cap_disconnects_only_that_peer(daemon, admin):
    assert (
        raw_exchange(daemon.endpoint, b"\x00" * (limits.MAX_TRANSPORT_BYTES + 1), timeout_ms=500)
        is None
    )
    assert admin.info().processes >= 0


def test_a_flood_of_garbage_from_one_peer_does_not_stop_another(daemon, spawn):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    for i in range(2000):
        sock.send(bytes([i % 256]) * (i % 50 + 1))
    p = spawn()
    assert p.getpid().pid == p.pid
    sock.close()


def test_the_async_client_runs_calls_concurrently(daemon):
    import asyncio

    async def go():
        async with AsyncClient(daemon.endpoint, pid=0, token=daemon.token) as c:
            procs = await asyncio.gather(*(c.spawn(f"a{i}") for i in range(3)))
            texts = await asyncio.gather(
                *(p.generate(prompt="Hi", max_tokens=4, **GREEDY) for p in procs)
            )
            pieces = [x async for x in procs[0].stream("Hello", max_tokens=4, **GREEDY)]
            for p in procs:
                await c.kill(p.pid, "KILL")
                await c.wait(p.pid)
            return texts, pieces

    texts, pieces = asyncio.run(go())
    assert len({t.text for t in texts}) == 1 and pieces


def test_sys_info_describes_the_kernel(admin):
    info = admin.info()
    assert info.abi == limits.ABI_VERSION and info.version and info.uptime_s > 0
    row = info.models[0]
    assert (row.driver, row.state, row.slots) == ("cpu", "ready", 2) and row.max_context >= 2048
    assert info.endpoints[0].startswith("ipc://")


def test_syscall_errors_are_typed_exceptions(admin):
    with pytest.raises(errors.ESRCH) as exc:
        admin.kill(99999, "KILL")
    assert isinstance(exc.value, SyscallError) and exc.value.code is Errno.ESRCH


def test_encode_request_interoperates_with_the_daemon(daemon):
    reply = raw_exchange(daemon.endpoint, codec.encode_request(11, "sys.info", {}, 0, daemon.token))
    assert reply["id"] == 11 and reply["ok"] is True


def test_an_adapter_the_model_does_not_serve_is_refused_at_spawn(admin) -> None:
    from syscalls.errors import ERRORS, Errno

    with pytest.raises(ERRORS[Errno.ENOTSUP], match="serves none"):
        admin.spawn("tuned", adapter="pirate")
    assert {m.name: m.adapters for m in admin.info().models} == {"SmolLM2-135M-Instruct": []}
