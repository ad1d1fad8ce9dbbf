"""The example agent programs, end to end: ``llmos run examples/NAME.py`` on a real kernel
with the packaged model. The model is tiny, so these check what the programs did
through the kernel (exit status, memory entries, files, process accounting), never the
quality of its answers."""

from __future__ import annotations

import re
import subprocess

import pytest

from llmos.client import Client
from tests.test_cli import Shell

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def sh(tmp_path_factory: pytest.TempPathFactory):
    shell = Shell(tmp_path_factory.mktemp("examples"))
    started = shell("kernel", "start", "--slots", "2")
    assert started.returncode == 0, started.stderr
    yield shell
    shell("kernel", "stop")


def run(sh: Shell, *args: str) -> subprocess.CompletedProcess[str]:
    res = sh("run", *args, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    return res


def home_file(admin: Client, namespace: str, path: str) -> str:
    """A file in a named program home, read through the kernel by a process of that program."""
    reader = admin.spawn("reader", namespace=namespace)
    try:
        text = reader.files.read(path)
    finally:
        admin.kill(reader.pid, "KILL")
        admin.wait(reader.pid, timeout=10)
    assert isinstance(text, str)
    return text


def test_customer_service_answers_from_archival_memory_and_remembers_the_name(sh):
    res = run(
        sh,
        "--namespace",
        "shop",
        "examples/customer_service.py",
        "--kb",
        "shop",
        "--add",
        "shipping=Shipping is free and takes 2 days.",
    )
    out = res.stdout
    assert "seeded 4 policies into shop" in out
    assert out.count("[support] bot:") == 3
    assert re.search(r"retrieved: returns \(", out)  # the return question found the returns policy
    assert "remembered the customer's name in core memory: Ada" in out
    with sh.admin() as c:
        kb = c.memory("shop")
        shipping = kb.search("shipping", k=5, filter={"kind": "policy", "topic": "shipping"})
        assert [e.text for e in shipping] == [
            "Shipping is free and takes 2 days."
        ]  # updated, not added
        assert len(kb.search("policy", k=20, filter={"kind": "policy"})) == 4
        assert "Ada" in kb.blocks()["customer"]
    again = run(
        sh,
        "--namespace",
        "shop",
        "examples/customer_service.py",
        "--kb",
        "shop",
        "What do you accept?",
    )
    assert "seeded" not in again.stdout  # the knowledge base outlived the first run
    assert "retrieved: payment (" in again.stdout


def test_dispatcher_prints_the_schedule_of_its_jobs(sh):
    out = run(sh, "examples/dispatcher.py").stdout
    assert "policy fair" in out
    rows = [line for line in out.splitlines() if re.match(r"\s*\d+\s+(0|10)\s", line)]
    assert len(rows) == 6 and sum("URGENT" in r for r in rows) == 2
    assert re.search(
        r"urgent jobs got a slot before the \d routine jobs queued ahead of them: (yes|no)", out
    )


def test_dispatcher_under_the_priority_policy_serves_urgent_jobs_first(tmp_path):
    shell = Shell(tmp_path)
    assert shell("kernel", "start", "--slots", "2", "--policy", "priority").returncode == 0
    try:
        out = run(shell, "examples/dispatcher.py").stdout
        assert "policy priority" in out
        assert re.search(r"before the [1-9] routine jobs queued ahead of them: yes", out), out
    finally:
        shell("kernel", "stop")


def test_monitor_logs_structured_verdicts_to_its_home(sh):
    out = run(
        sh, "--namespace", "watch", "examples/monitor.py", "--samples", "2", "--interval", "0.2"
    ).stdout
    assert out.count("verdict: abnormal=") == 2  # each verdict parsed from the constrained JSON
    assert "logged to /home/alerts.log" in out
    with sh.admin() as c:
        log = home_file(c, "watch", "/home/alerts.log").splitlines()
    assert len(log) == 2 and all(re.search(r" (ok|ALERT) \d+/2 slots busy", line) for line in log)


def test_summarize_search_summarises_sample_docs_and_answers_by_retrieval(sh):
    out = run(sh, "--namespace", "library", "examples/summarize_search.py").stdout
    assert len(re.findall(r"\[docs\] \w+\.txt \(\d+ bytes\): ", out)) == 3
    assert "sources: /home/docs/solar.txt" in out and "sources: /home/docs/bees.txt" in out
    assert out.count("[docs] answer:") == 2
    with sh.admin() as c:
        summaries = home_file(c, "library", "/home/summaries.md")
    assert summaries.startswith("# Summaries") and summaries.count("\n- **") == 3


def test_summarize_search_loads_files_named_on_the_command_line(sh, tmp_path):
    invoice = tmp_path / "invoice.txt"
    invoice.write_text(
        "Invoice 42 from Acme for 300 euros must be paid by Friday by bank transfer."
    )
    garden = tmp_path / "garden.txt"
    garden.write_text("Tomatoes need six hours of sun a day and water every morning in summer.")
    out = run(
        sh,
        "examples/summarize_search.py",
        str(invoice),
        str(garden),
        "-q",
        "When must the invoice be paid?",
    ).stdout
    assert "[docs] invoice.txt" in out and "[docs] garden.txt" in out and "solar" not in out
    assert "sources: /home/docs/invoice.txt" in out


def test_office_assistant_runs_workers_in_parallel_and_writes_a_report(sh):
    out = run(sh, "--namespace", "office", "examples/office_assistant.py").stdout
    statuses = re.findall(r"\[office\] worker (\d+) \(.*\) exited with status (\d+)", out)
    assert len(statuses) >= 2 and all(s == "0" for _, s in statuses)
    assert f"wrote /home/report.md ({len(statuses)} sections, 0 failed)" in out
    with sh.admin() as c:
        report = home_file(c, "office", "/home/report.md")
        assert all(p.name != "worker1" for p in c.ps())  # every worker was reaped
    assert report.startswith("# Report: ") and report.count("\n## ") == len(statuses)


def test_voice_assistant_serves_a_speak_tool_and_skips_speech_without_an_engine(sh):
    import shutil

    out = run(sh, "examples/voice_assistant.py", "Hello, I am Sam.", "What is my name?").stdout
    assert out.count("[voice] assistant:") == 2
    if shutil.which("espeak-ng") or shutil.which("espeak"):
        assert out.count("(spoken with ") == 2
    else:
        assert "speech is skipped (install it with `apt install espeak-ng`)" in out
        assert out.count("(speech skipped: no text-to-speech engine") == 2
    assert "2 turns" in out
    with sh.admin() as c:
        assert all(t.name != "speak" for t in c.tools())  # the tool left with its server
