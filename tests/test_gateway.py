"""The OpenAI-compatible gateway: a real gateway (uvicorn in a thread) on a real kernel
daemon, driven with the real ``openai`` package. Most tests run on the sim driver; the
ones that need real text (JSON that parses, a tool call) run on the packaged model."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from llmos.client import Client  # noqa: E402
from llmos.ctl.gateway import Gateway, create_app  # noqa: E402
from llmos.ctl.keys import KeyStore  # noqa: E402
from tests.conftest import wait_until  # noqa: E402
from tests.kernels import Daemon  # noqa: E402

SIM = "sim"


class Served:
    """A gateway serving a kernel on 127.0.0.1:PORT from a thread, with its key store."""

    def __init__(self, k: Daemon, keys: KeyStore) -> None:
        self.k, self.keys = k, keys
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.gw = Gateway(k.endpoint, k.token, keys, runtime_dir=k.run_dir)
        config = uvicorn.Config(
            create_app(self.gw), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=30)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str, **kw: Any) -> Any:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def aclient(self, key: str, **kw: Any) -> Any:
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _serve(tmp: Path, *kernel_args: str) -> tuple[Daemon, Served]:
    k = Daemon(tmp, *kernel_args).start()
    return k, Served(k, KeyStore(tmp / "keys.json"))


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    k, served = _serve(
        tmp_path_factory.mktemp("gw-sim"),
        "--driver",
        "sim",
        "--model-name",
        SIM,
        "--slots",
        "2",
        "--driver-option",
        "tokens_per_s=400",
    )
    yield served
    served.stop()
    k.stop()


@pytest.fixture(scope="module")
def key(sim: Served) -> str:
    return sim.keys.create("app", agents={"pirate": "You talk like a pirate."})


@pytest.fixture
def admin(sim: Served) -> Iterator[Client]:
    with sim.k.admin() as c:
        yield c


def _children(admin: Client, program: str) -> list[Any]:
    """Live processes of the key's program other than its top-level process."""
    rows = admin.ps()
    top = [r.pid for r in rows if r.name == program and r.ppid == 1]
    return [r for r in rows if r.program in top and r.pid not in top and r.state != "ZOMBIE"]


def test_chat_completion_in_openai_format(sim: Served, key: str) -> None:
    res = sim.client(key).chat.completions.create(
        model=SIM, messages=[{"role": "user", "content": "hello there"}], max_tokens=5
    )
    assert res.object == "chat.completion" and res.model == SIM
    choice = res.choices[0]
    assert choice.message.role == "assistant" and choice.message.content.split()[0].startswith("w")
    assert len(choice.message.content.split()) == 5 and choice.finish_reason == "length"
    assert res.usage.completion_tokens == 5 and res.usage.prompt_tokens > 0
    assert res.usage.total_tokens == res.usage.prompt_tokens + 5


def test_streaming_sends_chunks_finish_reason_and_usage(sim: Served, key: str) -> None:
    c = sim.client(key)
    msgs = [{"role": "user", "content": "count for me"}]
    whole = c.chat.completions.create(model=SIM, messages=msgs, max_tokens=6, temperature=0)
    chunks = list(
        c.chat.completions.create(
            model=SIM,
            messages=msgs,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] == "length" and set(finals[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_stream_ends_with_done(sim: Served, key: str) -> None:
    body = {
        "model": SIM,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
    }
    r = httpx.post(
        sim.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and json.loads(data[-2])["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_answer(sim: Served, key: str) -> None:
    c = sim.client(key)
    msgs = [{"role": "user", "content": "say words"}]
    words = c.chat.completions.create(model=SIM, messages=msgs, max_tokens=4, temperature=0)
    third = words.choices[0].message.content.split()[2]
    res = c.chat.completions.create(
        model=SIM, messages=msgs, max_tokens=4, temperature=0, stop=[third]
    )
    assert res.choices[0].finish_reason == "stop"
    assert res.choices[0].message.content.split() == words.choices[0].message.content.split()[:2]


def test_no_unknown_or_revoked_key_is_401(sim: Served) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError) as e:
        sim.client("llmos-not-a-key").chat.completions.create(model=SIM, messages=msgs)
    assert e.value.status_code == 401 and e.value.code == "invalid_api_key"
    gone = sim.keys.create("gone")
    assert sim.client(gone).models.list().data
    sim.keys.revoke("gone")
    with pytest.raises(openai.AuthenticationError):
        sim.client(gone).chat.completions.create(model=SIM, messages=msgs)
    r = httpx.get(sim.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"


def test_unknown_model_is_404(sim: Served, key: str) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        sim.client(key).chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}]
        )
    assert e.value.status_code == 404 and "gpt-9" in e.value.message
    assert e.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 5}, "temperature"),
        ({"messages": []}, "messages"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ],
)
def test_bad_body_is_400_naming_the_field(
    sim: Served, key: str, extra: dict[str, Any], field: str
) -> None:
    body = {"model": SIM, "messages": [{"role": "user", "content": "hi"}], **extra}
    if field == "tool_choice":
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with pytest.raises(openai.BadRequestError) as e:
        sim.client(key).chat.completions.create(**body)
    assert e.value.status_code == 400 and field in e.value.message
    assert e.value.param is not None and field in e.value.param


def test_oversized_or_malformed_body_is_refused(sim: Served, key: str) -> None:
    auth = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    url = sim.url + "/v1/chat/completions"
    r = httpx.post(url, content=b"x" * (2 << 20), headers=auth, timeout=30)
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.post(url, content=b"{not json", headers=auth, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"]
    assert httpx.get(sim.url + "/health").json()["status"] == "ok"  # still serving


def test_quota_is_429_naming_the_limit(sim: Served) -> None:
    small = sim.keys.create("small", limits={"max_output_tokens": 8})
    c = sim.client(small)
    msgs = [{"role": "user", "content": "hi"}]
    c.chat.completions.create(model=SIM, messages=msgs, max_tokens=8)
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model=SIM, messages=msgs, max_tokens=8)
    assert e.value.status_code == 429 and "max_output_tokens" in e.value.message
    with pytest.raises(openai.RateLimitError):  # streaming: refused before the stream starts
        c.chat.completions.create(model=SIM, messages=msgs, max_tokens=8, stream=True)


def test_deadline_is_504(sim: Served, key: str) -> None:
    with pytest.raises(openai.APIStatusError) as e:
        sim.client(key).chat.completions.create(
            model=SIM,
            messages=[{"role": "user", "content": "a long one"}],
            max_tokens=4000,
            extra_headers={"X-Llmos-Timeout": "0.3"},
        )
    assert e.value.status_code == 504


def test_session_keeps_context_and_recognises_a_resent_prefix(
    sim: Served, key: str, admin: Client
) -> None:
    c = sim.client(key, default_headers={"X-Llmos-Session": "s1"})
    first = [{"role": "user", "content": "my name is Ada"}]
    a1 = c.chat.completions.create(model=SIM, messages=first, max_tokens=3, temperature=0)
    reply = a1.choices[0].message.content
    again = [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "and?"}]
    c.chat.completions.create(model=SIM, messages=again, max_tokens=3, temperature=0)
    c.chat.completions.create(  # only the new turn
        model=SIM, messages=[{"role": "user", "content": "more"}], max_tokens=3
    )
    sess = [r for r in admin.ps() if r.name == "session" and r.state != "ZOMBIE"]
    assert len(sess) == 1
    ctx = admin.call("ctx.get", {"pid": sess[0].pid})
    turns = [(m["role"], m["content"]) for m in ctx["messages"]]
    assert turns[0] == ("user", "my name is Ada") and turns[1] == ("assistant", reply)
    assert [r for r, _ in turns] == ["user", "assistant"] * 3  # nothing duplicated
    assert turns[2] == ("user", "and?") and turns[4] == ("user", "more")
    # the body's `user` names a session too; another session is another process
    c2 = sim.client(key)
    c2.chat.completions.create(model=SIM, messages=first, max_tokens=2, user="s2")
    assert len([r for r in admin.ps() if r.name == "session" and r.state != "ZOMBIE"]) == 2
    assert _children(admin, "app") and all(r.name == "session" for r in _children(admin, "app"))


def test_a_killed_session_or_program_is_made_again(sim: Served, admin: Client) -> None:
    k = sim.keys.create("phoenix")
    c = sim.client(k, default_headers={"X-Llmos-Session": "s"})
    msgs = [{"role": "user", "content": "hi"}]
    c.chat.completions.create(model=SIM, messages=msgs, max_tokens=2)
    (sess,) = [r for r in _children(admin, "phoenix") if r.name == "session"]
    admin.kill(sess.pid, "KILL")  # the operator kills the session: only it is made again
    assert c.chat.completions.create(model=SIM, messages=msgs, max_tokens=2).choices
    rows = admin.ps()
    (top,) = [r for r in rows if r.name == "phoenix" and r.ppid == 1 and r.state != "ZOMBIE"]
    assert top.pid == sess.program
    for r in rows:  # now the whole program
        if r.program == top.pid and r.state != "ZOMBIE":
            admin.kill(r.pid, "KILL")
    assert c.chat.completions.create(model=SIM, messages=msgs, max_tokens=2).choices
    assert sim.client(k).chat.completions.create(model=SIM, messages=msgs, max_tokens=2).choices


def test_stateless_requests_leave_no_process_behind(sim: Served, admin: Client) -> None:
    k2 = sim.keys.create("stateless")
    c = sim.client(k2)
    for _ in range(3):
        c.chat.completions.create(
            model=SIM, messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    list(
        c.chat.completions.create(
            model=SIM, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True
        )
    )
    # reaped right behind each answer (the response does not wait for the reap)
    wait_until(lambda: _children(admin, "stateless") == [], timeout=10)
    wait_until(lambda: not [r for r in admin.ps() if r.state == "ZOMBIE" and r.name == "chat"])


def test_client_disconnect_mid_stream_frees_the_slot(sim: Served, admin: Client) -> None:
    k3 = sim.keys.create("leaver")

    async def leave() -> None:
        c = sim.aclient(k3)
        stream = await c.chat.completions.create(
            model=SIM,
            messages=[{"role": "user", "content": "a very long answer"}],
            max_tokens=8000,  # 20 s at 400 tokens/s: only an abort ends it soon
            stream=True,
        )
        n = 0
        async for _ in stream:
            n += 1
            if n == 5:
                break
        await stream.close()
        await c.close()

    t0 = time.monotonic()
    asyncio.run(leave())
    wait_until(lambda: _children(admin, "leaver") == [], timeout=10)
    wait_until(lambda: all(m.busy == 0 for m in admin.stat(procs=False).models), timeout=5)
    assert time.monotonic() - t0 < 10


def test_client_leaving_a_whole_request_frees_the_slot(sim: Served, admin: Client) -> None:
    k = sim.keys.create("impatient")
    body = {
        "model": SIM,
        "messages": [{"role": "user", "content": "a very long answer"}],
        "max_tokens": 8000,  # 20 s at 400 tokens/s
    }
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            sim.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {k}"},
            timeout=1.0,
        )
    wait_until(lambda: _children(admin, "impatient") == [], timeout=10)
    wait_until(lambda: all(m.busy == 0 for m in admin.stat(procs=False).models), timeout=5)
    assert time.monotonic() - t0 < 10


def test_models_lists_kernel_models_and_the_keys_agents(sim: Served, key: str) -> None:
    ids = [m.id for m in sim.client(key).models.list().data]
    assert ids == [SIM, "pirate"]
    res = sim.client(key).chat.completions.create(
        model="pirate", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert res.model == "pirate" and res.choices[0].message.content


def test_async_client_runs_requests_concurrently(sim: Served, key: str) -> None:
    async def many() -> list[str]:
        c = sim.aclient(key)
        res = await asyncio.gather(
            *[
                c.chat.completions.create(
                    model=SIM, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=4
                )
                for i in range(4)
            ]
        )
        await c.close()
        return [r.choices[0].message.content for r in res]

    texts = asyncio.run(many())
    assert len(texts) == 4 and all(len(t.split()) == 4 for t in texts)


def test_completions_raw_prompt_whole_and_streamed(sim: Served, key: str, admin: Client) -> None:
    c = sim.client(key)
    res = c.completions.create(model=SIM, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert res.object == "text_completion" and res.choices[0].finish_reason == "length"
    assert len(res.choices[0].text.split()) == 4 and res.usage.completion_tokens == 4
    chunks = list(
        c.completions.create(
            model=SIM,
            prompt="Once upon a time",
            max_tokens=4,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == res.choices[0].text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 4
    echoed = c.completions.create(model=SIM, prompt="Hi", max_tokens=2, echo=True)
    assert echoed.choices[0].text.startswith("Hi ")
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=SIM, prompt=["a", "b"], max_tokens=2)
    assert _children(admin, "app") == [] or all(
        r.name == "session" for r in _children(admin, "app")
    )


def test_priority_header_sets_the_requests_nice(sim: Served, admin: Client) -> None:
    k = sim.keys.create("nice")

    async def run() -> int:
        c = sim.aclient(k, default_headers={"X-Llmos-Priority": "7"})
        stream = await c.chat.completions.create(
            model=SIM, messages=[{"role": "user", "content": "x"}], max_tokens=200, stream=True
        )
        async for _ in stream:
            nice = [r.nice for r in _children(admin, "nice")]
            break
        await stream.close()
        await c.close()
        return nice[0]

    assert asyncio.run(run()) == 7
    with pytest.raises(openai.BadRequestError) as e:
        sim.client(k).chat.completions.create(
            model=SIM,
            messages=[{"role": "user", "content": "x"}],
            extra_headers={"X-Llmos-Priority": "-5"},
        )
    assert "x-llmos-priority" in e.value.message
    floor = sim.keys.create("nice-floor", nice=5)  # the key's own priority: 5..19 only
    c = sim.client(floor, default_headers={"X-Llmos-Session": "n"})
    c.chat.completions.create(model=SIM, messages=[{"role": "user", "content": "x"}],
                              max_tokens=2)  # fmt: skip
    (sess,) = _children(admin, "nice-floor")
    assert sess.nice == 5
    c.chat.completions.create(model=SIM, messages=[{"role": "user", "content": "x"}],
                              max_tokens=2, extra_headers={"X-Llmos-Priority": "9"})  # fmt: skip
    assert admin.ps(sess.pid)[0].nice == 9  # a session's turn runs at its request's nice
    with pytest.raises(openai.PermissionDeniedError) as e:
        c.chat.completions.create(model=SIM, messages=[{"role": "user", "content": "x"}],
                                  extra_headers={"X-Llmos-Priority": "4"})  # fmt: skip
    assert e.value.body["code"] == "priority_not_allowed" and "nice 5" in e.value.message


def test_concurrent_first_requests_make_one_program_and_one_session(
    sim: Served, admin: Client
) -> None:
    k = sim.keys.create("burst")

    async def burst() -> None:
        c = sim.aclient(k, default_headers={"X-Llmos-Session": "one"})
        await asyncio.gather(
            *[
                c.chat.completions.create(
                    model=SIM, messages=[{"role": "user", "content": f"q{i}"}], max_tokens=2
                )
                for i in range(4)
            ]
        )
        await c.close()

    asyncio.run(burst())
    rows = admin.ps()
    assert len([r for r in rows if r.name == "burst" and r.ppid == 1]) == 1
    sessions = [r for r in _children(admin, "burst") if r.name == "session"]
    assert len(sessions) == 1
    ctx = admin.call("ctx.get", {"pid": sessions[0].pid})
    assert [m["role"] for m in ctx["messages"]] == ["user", "assistant"] * 4  # one at a time


def test_responses_whole_streamed_and_chained_by_previous_response_id(
    sim: Served, admin: Client
) -> None:
    c = sim.client(sim.keys.create("resp"))
    r1 = c.responses.create(model=SIM, input="hello there", max_output_tokens=4, temperature=0)
    assert r1.object == "response" and r1.status == "incomplete"
    assert r1.incomplete_details.reason == "max_output_tokens"
    assert len(r1.output_text.split()) == 4 and r1.usage.output_tokens == 4
    r2 = c.responses.create(
        model=SIM, input="and more", previous_response_id=r1.id, max_output_tokens=3
    )
    assert r2.previous_response_id == r1.id and len(r2.output_text.split()) == 3
    sessions = [r for r in _children(admin, "resp") if r.name == "session"]
    assert len(sessions) == 1  # one chain, one process keeping its context
    ctx = admin.call("ctx.get", {"pid": sessions[0].pid})
    assert [(m["role"], m["content"]) for m in ctx["messages"]] == [
        ("user", "hello there"),
        ("assistant", r1.output_text),
        ("user", "and more"),
        ("assistant", r2.output_text),
    ]
    events = list(
        c.responses.create(
            model=SIM, input="hello there", max_output_tokens=4, temperature=0, stream=True
        )
    )
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r1.output_text == events[-1].response.output_text
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model=SIM, input="x", previous_response_id="resp_nope")
    stateless = c.responses.create(model=SIM, input="x", max_output_tokens=2, store=False)
    assert stateless.output_text
    assert len([r for r in _children(admin, "resp") if r.name == "session"]) == 2


def test_responses_chain_keeps_its_session_with_instructions_and_404s_when_gone(
    sim: Served, admin: Client
) -> None:
    c = sim.client(sim.keys.create("resp-instr"))
    told = "Answer in one word."
    r1 = c.responses.create(model=SIM, input="my name is Ada", instructions=told,
                            max_output_tokens=3)  # fmt: skip
    r2 = c.responses.create(model=SIM, input="my name?", instructions=told,
                            previous_response_id=r1.id, max_output_tokens=3)  # fmt: skip
    r3 = c.responses.create(model=SIM, input="again?", previous_response_id=r2.id,
                            max_output_tokens=3)  # fmt: skip
    assert r2.instructions == told and r3.instructions is None
    (sess,) = [r for r in _children(admin, "resp-instr") if r.name == "session"]
    ctx = admin.call("ctx.get", {"pid": sess.pid})["messages"]
    assert [(m["role"], m["content"]) for m in ctx] == [  # one session; instructions not kept
        ("user", "my name is Ada"), ("assistant", r1.output_text),
        ("user", "my name?"), ("assistant", r2.output_text),
        ("user", "again?"), ("assistant", r3.output_text),
    ]  # fmt: skip
    for gone in ("resp_unknown", r3.id):
        if gone == r3.id:
            admin.kill(sess.pid, "KILL")  # the session ended: its chain cannot go on
        r = httpx.post(
            sim.url + "/v1/responses",
            json={"model": SIM, "input": "x", "previous_response_id": gone},
            headers={"Authorization": f"Bearer {c.api_key}"},
        )
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["code"] == "previous_response_not_found"
        assert err["param"] == "previous_response_id" and err["message"]
    assert not [r for r in _children(admin, "resp-instr") if r.name == "session"]  # none made


def test_disconnect_on_a_session_cancels_the_turn_and_keeps_the_process(
    sim: Served, admin: Client
) -> None:
    c = sim.client(sim.keys.create("sess-leaver"), default_headers={"X-Llmos-Session": "s"})
    c.chat.completions.create(model=SIM, messages=[{"role": "user", "content": "hi"}],
                              max_tokens=2)  # fmt: skip
    (sess,) = _children(admin, "sess-leaver")
    before = admin.call("ctx.get", {"pid": sess.pid})["messages"]

    async def leave() -> None:
        ac = sim.aclient(c.api_key, default_headers={"X-Llmos-Session": "s"})
        stream = await ac.chat.completions.create(
            model=SIM, messages=[{"role": "user", "content": "a very long answer"}],
            max_tokens=8000, stream=True,
        )  # fmt: skip
        n = 0
        async for _ in stream:
            n += 1
            if n == 5:
                break
        await stream.close()
        await ac.close()

    t0 = time.monotonic()
    asyncio.run(leave())
    wait_until(lambda: all(m.busy == 0 for m in admin.stat(procs=False).models), timeout=10)
    assert time.monotonic() - t0 < 10  # cancelled, not run to its 8000 tokens
    (row,) = admin.ps(sess.pid)
    assert row.state == "WAITING" and row.output_tokens >= 5  # the same process goes on
    assert admin.call("ctx.get", {"pid": sess.pid})["messages"] == before  # no half turn
    c.chat.completions.create(model=SIM, messages=[{"role": "user", "content": "next"}],
                              max_tokens=2)  # fmt: skip
    after = admin.call("ctx.get", {"pid": sess.pid})["messages"]
    assert after[: len(before)] == before and [m["content"] for m in after][-2] == "next"
    assert [r.pid for r in _children(admin, "sess-leaver")] == [sess.pid]


def test_concurrent_requests_on_a_session_queue_in_order_and_409_past_the_bound(
    sim: Served, admin: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llmos.ctl.gateway as gateway

    k = sim.keys.create("queue")
    log: list[str] = []

    async def turn(c: Any, name: str, tokens: int) -> None:
        stream = await c.chat.completions.create(
            model=SIM, messages=[{"role": "user", "content": name}], max_tokens=tokens,
            stream=True,
        )  # fmt: skip
        async for ch in stream:
            if ch.choices and ch.choices[0].delta.content and f"{name} first" not in log:
                log.append(f"{name} first")
        log.append(f"{name} done")

    async def two() -> None:
        c = sim.aclient(k, default_headers={"X-Llmos-Session": "q"})
        first = asyncio.ensure_future(turn(c, "A", 80))
        await wait_for(lambda: "A first" in log)
        await turn(c, "B", 4)  # sent while A streams: it waits for A, then runs
        await first
        await c.close()

    async def wait_for(cond: Any) -> None:
        while not cond():
            await asyncio.sleep(0.01)

    asyncio.run(two())
    assert log == ["A first", "A done", "B first", "B done"]
    (sess,) = _children(admin, "queue")
    ctx = admin.call("ctx.get", {"pid": sess.pid})["messages"]
    assert [m["content"] for m in ctx if m["role"] == "user"] == ["A", "B"]

    monkeypatch.setattr(gateway, "MAX_WAITING_PER_SESSION", 1)

    async def three() -> list[Any]:
        c = sim.aclient(k, default_headers={"X-Llmos-Session": "q"})
        out = await asyncio.gather(
            *[
                c.chat.completions.create(
                    model=SIM, messages=[{"role": "user", "content": f"c{i}"}], max_tokens=200
                )
                for i in range(3)
            ],
            return_exceptions=True,
        )
        await c.close()
        return out

    out = asyncio.run(three())
    busy = [e for e in out if isinstance(e, openai.APIStatusError)]
    assert len(busy) == 1 and busy[0].status_code == 409, out
    assert busy[0].body["code"] == "session_busy" and "one at a time" in busy[0].message
    ctx = admin.call("ctx.get", {"pid": sess.pid})["messages"]
    assert len(ctx) == 4 + 4  # the two that ran are kept, the refused one is not


def test_metrics_parse_with_prometheus_client(sim: Served, key: str) -> None:
    sim.client(key).chat.completions.create(
        model=SIM, messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    text = httpx.get(sim.url + "/metrics").text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    reqs = [
        s
        for s in fams["llmos_gateway_requests"].samples
        if s.name.endswith("_total") and s.labels["model"] == SIM and s.labels["status"] == "200"
    ]
    assert reqs and reqs[0].value >= 1
    out = [s for s in fams["llmos_gateway_tokens"].samples if s.labels.get("direction") == "out"]
    assert sum(s.value for s in out if s.name.endswith("_total")) >= 3
    assert "llmos_gateway_request_seconds" in fams and "llmos_model_slots" in fams
    slots = [s for s in fams["llmos_model_slots"].samples if s.labels["model"] == SIM]
    assert slots[0].value == 2


def test_unknown_model_names_make_no_new_metric_series(sim: Served, key: str) -> None:
    for name in ("nope-1", "nope-2"):
        with pytest.raises(openai.NotFoundError):
            sim.client(key).chat.completions.create(
                model=name, messages=[{"role": "user", "content": "hi"}]
            )
    text = httpx.get(sim.url + "/metrics").text
    assert "nope-1" not in text and 'model="unknown",status="404"' in text


def test_a_key_with_tools_and_namespace_and_a_kernel_restart(tmp_path: Path) -> None:
    k, served = _serve(tmp_path, "--driver", "sim")
    try:
        key = served.keys.create("tooled", namespace="tooled", tools=["calculator", "fs_*"])
        c = served.client(key)
        msgs = [{"role": "user", "content": "hi"}]
        assert c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=2)
        k.stop()
        k.start()  # the same runtime and state dirs: a restarted kernel
        res = c.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=2)
        assert res.choices[0].message.content
    finally:
        served.stop()
        k.stop()


def test_health_and_503_when_the_kernel_is_down(tmp_path: Path) -> None:
    k, served = _serve(tmp_path, "--driver", "sim")
    try:
        key = served.keys.create("k")
        assert httpx.get(served.url + "/health").json()["status"] == "ok"
        k.stop()
        assert httpx.get(served.url + "/health").status_code == 503
        with pytest.raises(openai.InternalServerError) as e:
            served.client(key).chat.completions.create(
                model="sim", messages=[{"role": "user", "content": "hi"}]
            )
        assert e.value.status_code == 503
    finally:
        served.stop()
        k.stop()


def test_keys_command_prints_once_and_stores_only_a_hash(tmp_path: Path) -> None:
    env = {**os.environ, "LLMOS_STATE_DIR": str(tmp_path / "state")}

    def llmos(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llmos.ctl.cli", *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    made = llmos(
        "keys", "create", "bot", "--limit", "max_output_tokens=100", "--agent", "poet=Rhyme.",
        "--nice", "3",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("llmos-") and len(key) > 40
    path = tmp_path / "state" / "gateway-keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and key not in path.read_text()
    listed = llmos("keys", "list", "--json")
    assert key not in listed.stdout
    row = json.loads(listed.stdout)[0]
    assert row["name"] == "bot" and row["limits"] == {"max_output_tokens": 100}
    assert row["agents"] == {"poet": "Rhyme."} and row["revoked"] is None and row["nice"] == 3
    assert llmos("keys", "create", "low", "--nice", "20").returncode != 0  # 0..19 only
    assert KeyStore(path).lookup(key) is not None
    assert llmos("keys", "revoke", "bot").returncode == 0
    assert KeyStore(path).lookup(key) is None
    assert llmos("keys", "revoke", "bot").returncode == 1


# -- the real model: text that must parse ---------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    k, served = _serve(tmp_path_factory.mktemp("gw-cpu"), "--slots", "1")
    yield served
    served.stop()
    k.stop()


@pytest.mark.model
def test_json_schema_output_parses(real: Served) -> None:
    c = real.client(real.keys.create("json"))
    model = c.models.list().data[0].id
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "country": {"type": "string"}},
        "required": ["name", "country"],
    }
    res = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Name a city in France."}],
        max_tokens=60,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema},
        },
    )
    city = json.loads(res.choices[0].message.content)
    assert set(city) == {"name", "country"} and res.choices[0].finish_reason == "stop"
    obj = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Describe a cat as JSON."}],
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)


@pytest.mark.model
def test_tool_call_round_trip(real: Served) -> None:
    c = real.client(real.keys.create("tools"))
    model = c.models.list().data[0].id
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "the weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    msgs: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    res = c.chat.completions.create(
        model=model,
        messages=msgs,
        tools=tools,
        tool_choice="required",
        max_tokens=60,
        temperature=0,
    )
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    msgs += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "sunny"}'},
    ]
    final = c.chat.completions.create(
        model=model, messages=msgs, tools=tools, tool_choice="none", max_tokens=40, temperature=0
    )
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
    streamed = list(  # a streamed tool step: the call arrives whole in one delta
        c.chat.completions.create(
            model=model,
            messages=msgs[:1],
            tools=tools,
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    deltas = [
        ch.choices[0].delta for ch in streamed if ch.choices and ch.choices[0].delta.tool_calls
    ]
    assert deltas and deltas[0].tool_calls[0].function.name == "get_weather"
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.model
def test_openai_agents_sdk_runs_a_function_tool_end_to_end(real: Served) -> None:
    agents = pytest.importorskip("agents")  # openai-agents, the OpenAI Agents SDK
    agents.set_tracing_disabled(True)  # nothing leaves the machine
    key = real.keys.create("agents")
    model = real.client(key).models.list().data[0].id
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    agent = agents.Agent(
        name="weather",
        instructions="Answer with the get_weather tool.",
        tools=[get_weather],
        model=agents.OpenAIChatCompletionsModel(
            model=model,
            openai_client=openai.AsyncOpenAI(base_url=real.url + "/v1", api_key=key, max_retries=0),
        ),
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
        tool_use_behavior="stop_on_first_tool",  # the tool's result is the run's answer
    )
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?")
    assert calls and result.final_output == f"sunny in {calls[0]}"


@pytest.mark.model
def test_responses_function_tool_round_trip(real: Served) -> None:
    c = real.client(real.keys.create("resp-tools"))
    model = c.models.list().data[0].id
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "the weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        }
    ]
    ask = "What is the weather in Paris?"
    r1 = c.responses.create(
        model=model, input=ask, tools=tools, tool_choice="required", max_output_tokens=60,
        temperature=0,
    )  # fmt: skip
    call = r1.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)
    r2 = c.responses.create(
        model=model,
        previous_response_id=r1.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
        tools=tools,
        tool_choice="none",
        max_output_tokens=30,
        temperature=0,
    )
    assert r2.output[0].type == "message" and r2.output_text
    events = list(
        c.responses.create(
            model=model,
            input=ask,
            tools=tools,
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    types = [e.type for e in events]
    assert "response.function_call_arguments.done" in types
    assert types[-1] == "response.completed"
    assert events[-1].response.output[0].type == "function_call"


@pytest.mark.model
def test_responses_follow_up_with_instructions_recalls_the_first(real: Served) -> None:
    c = real.client(real.keys.create("recall"))
    model = c.models.list().data[0].id
    told = "You are a helpful assistant. Answer briefly."
    r1 = c.responses.create(
        model=model, instructions=told, input="My name is Ada. Please remember my name.",
        max_output_tokens=20, temperature=0,
    )  # fmt: skip
    r2 = c.responses.create(
        model=model, instructions=told, previous_response_id=r1.id,
        input="What is my name?", max_output_tokens=20, temperature=0,
    )  # fmt: skip
    assert "Ada" in r2.output_text, r2.output_text
    assert r2.usage.input_tokens > r1.usage.input_tokens  # the first turn was in its prompt
