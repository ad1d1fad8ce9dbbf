"""Traces and metrics of a real kernel daemon (sim driver): a program's spans form one
tree (`llmos trace --json` and the trace files), a real OTLP/HTTP receiver gets them,
`/metrics` parses as Prometheus text and its counters move; bad options are refused."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from prometheus_client.parser import text_string_to_metric_families

from llmos.errors import EDQUOT
from tests.kernels import Daemon

ROOT = Path(__file__).resolve().parent.parent
SECRET_PROMPT = "the-launch-code-is-7781 <sim:reply=6>"


class OtlpReceiver:
    """A small OTLP/HTTP trace receiver: decodes each ExportTraceServiceRequest it is
    POSTed (protobuf, as a collector does) and keeps its spans."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.requests = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                for rs in req.resource_spans:
                    for ss in rs.scope_spans:
                        receiver.spans.extend(ss.spans)
                receiver.requests += 1
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One daemon with tracing (files + OTLP) and metrics, and a program run on it: a
    parent that spawns a child serving a tool, calls that tool, generates, messages
    the child; the child receives and exits."""
    receiver = OtlpReceiver()
    port = free_port()
    base = tmp_path_factory.mktemp("obs")
    daemon = Daemon(
        base, "--driver", "sim", "--metrics", f"127.0.0.1:{port}", "--otlp-endpoint", receiver.url
    )
    daemon.start(timeout=180)
    try:
        admin = daemon.admin()
        parent = admin.spawn("agent")
        child = parent.spawn("helper")
        child.tools.register(
            "lookup", "look a word up", {"type": "object", "properties": {"q": {"type": "string"}}}
        )
        done = threading.Event()
        server = threading.Thread(
            target=lambda: child.tools.serve(
                {"lookup": lambda q: {"n": len(q)}}, stop=done.is_set, poll_s=0.2
            )
        )
        server.start()
        assert parent.tools.call("lookup", {"q": "hello"}) == {"n": 5}
        gen = parent.generate(prompt=SECRET_PROMPT, max_tokens=8)
        parent.send(child.pid, {"note": "the-body-stays-out"})
        done.set()
        server.join()
        assert child.recv(timeout=5).body == {"note": "the-body-stays-out"}
        child.exit(0)
        parent.wait(child.pid)
        yield {
            "daemon": daemon,
            "admin": admin,
            "parent": parent,
            "child": child,
            "gen": gen,
            "receiver": receiver,
            "metrics": f"http://127.0.0.1:{port}/metrics",
        }
    finally:
        daemon.stop()
        receiver.close()


def llmos(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", *args],
        env=daemon.env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def walk(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node["children"]:
        yield from walk(child)


def trace_json(daemon: Daemon, ref: str, want: str) -> dict[str, Any]:
    """`llmos trace REF --json`, again until span ``want`` has been exported."""
    deadline = time.monotonic() + 20
    while True:
        res = llmos(daemon, "trace", ref, "--json")
        if res.returncode == 0:
            out = json.loads(res.stdout)
            if any(n["name"] == want for r in out["roots"] for n in walk(r)):
                return out
        assert time.monotonic() < deadline, res.stderr
        time.sleep(0.3)


def test_a_program_with_a_child_and_a_served_tool_forms_one_trace_tree(observed):
    parent, child = observed["parent"], observed["child"]
    out = trace_json(observed["daemon"], str(parent.pid), f"process {child.pid}")
    assert out["program"] == parent.pid
    roots = out["roots"]
    assert len(roots) == 1  # the admin's spawn that started the program
    root = roots[0]
    assert root["name"] == "proc.spawn" and root["attrs"]["llmos.child"] == parent.pid
    nodes = list(walk(root))
    assert len({n["trace"] for n in nodes}) == 1  # one trace per program
    by = {(n["name"], n["attrs"].get("llmos.pid")): n for n in nodes}
    proc_parent = root["children"][0]
    assert proc_parent["name"] == f"process {parent.pid}"
    # the child's process span hangs under the parent's proc.spawn span
    spawn = by[("proc.spawn", parent.pid)]
    assert spawn["children"][0]["name"] == f"process {child.pid}"
    assert spawn["children"][0]["attrs"]["llmos.exit_status"] == 0
    child_calls = {c["name"] for c in spawn["children"][0]["children"]}
    assert {"tool.register", "tool.next", "tool.reply", "ipc.recv", "proc.exit"} <= child_calls
    # the served tool: the server's tool.next and tool.reply link to the caller's tool.call
    call = by[("tool.call", parent.pid)]
    assert call["attrs"]["llmos.tool"] == "lookup"
    assert call["attrs"]["llmos.tool.server"] == child.pid
    assert {(x["name"], x["attrs"]["llmos.pid"]) for x in call["linked"]} == {
        ("tool.next", child.pid),
        ("tool.reply", child.pid),
    }
    # IPC: the recv links to the send
    send = by[("ipc.send", parent.pid)]
    assert [(x["name"], x["attrs"]["llmos.pid"]) for x in send["linked"]] == [
        ("ipc.recv", child.pid)
    ]
    # generation: model, tokens, queue wait, preemptions
    gen = by[("llm.generate", parent.pid)]
    assert gen["attrs"]["gen_ai.usage.output_tokens"] == observed["gen"].usage.output_tokens
    assert gen["attrs"]["gen_ai.usage.input_tokens"] == observed["gen"].usage.prompt_tokens
    assert gen["attrs"]["llmos.queue_wait_s"] >= 0 and gen["attrs"]["llmos.preemptions"] == 0
    assert gen["attrs"]["gen_ai.request.model"]
    # the child's own view: its part of the tree, under the spawn that made it
    sub = trace_json(observed["daemon"], str(child.pid), "proc.exit")["roots"]
    assert [n["name"] for n in sub] == ["proc.spawn"]
    assert sub[0]["children"][0]["name"] == f"process {child.pid}"
    # the rich tree names the steps
    text = llmos(observed["daemon"], "trace", str(parent.pid)).stdout
    assert "tool.call" in text and "served by pid" in text and "⇠ tool.next" in text


def test_trace_files_are_owner_only_and_carry_no_contents(observed):
    parent = observed["parent"]
    trace_json(observed["daemon"], str(parent.pid), "proc.wait")
    folder = observed["daemon"].state_dir / "traces"
    files = list(folder.iterdir())
    assert files
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    text = (folder / "spans.jsonl").read_text()
    for secret in (parent.token, observed["child"].token, "launch-code", "the-body-stays-out"):
        assert secret not in text
    assert observed["daemon"].token not in text


def test_the_otlp_receiver_gets_the_programs_spans(observed):
    receiver, parent = observed["receiver"], observed["parent"]
    deadline = time.monotonic() + 20
    while not any(s.name == "proc.wait" for s in receiver.spans):
        assert time.monotonic() < deadline, f"{len(receiver.spans)} spans arrived"
        time.sleep(0.3)
    names = {s.name for s in receiver.spans}
    assert {"proc.spawn", "tool.call", "tool.next", "llm.generate", "ipc.send", "ipc.recv"} <= names
    call = next(s for s in receiver.spans if s.name == "tool.call")
    served = [s for s in receiver.spans if s.name in ("tool.next", "tool.reply") and s.links]
    assert served and all(s.links[0].span_id == call.span_id for s in served)
    assert {s.trace_id for s in receiver.spans} == {call.trace_id}
    attrs = {a.key: a.value for a in call.attributes}
    assert attrs["llmos.program"].int_value == parent.pid


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_parse_and_their_counters_move(observed):
    url, parent = observed["metrics"], observed["parent"]
    before = scrape(url)
    getpid = ("llmos_syscalls_total", (("errno", "ok"), ("syscall", "proc.getpid")))
    for _ in range(5):
        parent.getpid()
    limited = parent.spawn("limited", limits={"max_calls_per_min": 1})
    limited.generate(prompt="hi <sim:reply=2>", max_tokens=4)
    with pytest.raises(EDQUOT):
        limited.generate(prompt="hi <sim:reply=2>", max_tokens=4)
    after = scrape(url)  # a scrape drains the observer first: no wait needed
    assert after[getpid] - before.get(getpid, 0) == 5
    assert after[("llmos_quota_refusals_total", (("limit", "max_calls_per_min"),))] == 1
    assert after[("llmos_syscalls_total", (("errno", "EDQUOT"), ("syscall", "llm.generate")))] == 1
    model = observed["admin"].info().models[0].name
    out = ("llmos_output_tokens_total", (("model", model),))
    assert after[out] >= before.get(out, 0) + 2
    assert after[("llmos_slots", (("model", model),))] >= 1
    assert after[("llmos_slots_busy", (("model", model),))] == 0
    assert ("llmos_run_queue", (("model", model), ("state", "READY"))) in after
    assert after[("llmos_processes", (("state", "ZOMBIE"),))] >= 0
    count = ("llmos_syscall_duration_seconds_count", (("syscall", "proc.getpid"),))
    assert after[count] >= 5
    commits = ("llmos_store_commit_seconds_count", ())
    assert after[commits] > before.get(commits, 0)  # the spawn was journaled
    assert ("llmos_store_queue_depth", ()) in after
    assert after[("llmos_trace_records_dropped_total", ())] == 0


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("nonsense", "expected [HOST:]PORT"),
        ("127.0.0.1:99999", "1-65535"),
        ("example.com:9464", "not an IP address"),
    ],
)
def test_a_bad_metrics_address_is_refused(tmp_path, value, says):
    env = {
        **os.environ,
        "LLMOS_RUNTIME_DIR": str(tmp_path / "run"),
        "LLMOS_STATE_DIR": str(tmp_path / "state"),
    }
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmos.ctl.cli",
            "kernel",
            "start",
            "--driver",
            "sim",
            "--metrics",
            value,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2, res.stderr
    assert says in res.stderr


def test_a_bad_otlp_endpoint_is_refused(tmp_path):
    env = {
        **os.environ,
        "LLMOS_RUNTIME_DIR": str(tmp_path / "r"),
        "LLMOS_STATE_DIR": str(tmp_path / "s"),
    }
    res = subprocess.run(
        [sys.executable, "-m", "llmos.ctl.cli", "kernel", "start", "--otlp-endpoint", "ftp://x"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "http(s) URL" in res.stderr


def test_a_taken_metrics_port_fails_the_start_with_a_sentence(observed, tmp_path):
    port = observed["metrics"].split(":")[2].split("/")[0]
    res = subprocess.run(
        [sys.executable, "-m", "kernel", "--driver", "sim", "--metrics", f"127.0.0.1:{port}",
         "--runtime-dir", str(tmp_path / "run"), "--state-dir", str(tmp_path / "state")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert res.returncode == 1, res.stderr[-2000:]
    assert f"cannot serve metrics on 127.0.0.1:{port}" in res.stderr
