"""PII redaction (kernel/redact.py): what a redacting process's stores keep.

The recognisers are Presidio's offline pattern recognisers; the corpus below is
real-looking data (valid card checksums, valid IBANs, numbers in several countries'
formats) next to look-alikes that must survive (a card number failing Luhn, dates,
version strings, order numbers).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kernel.audit import digest
from kernel.redact import Redactor, merge_spans
from llmos import Client
from llmos.errors import EINVAL
from syscalls import models as m
from tests.kernels import Daemon

ALL = ("email", "phone", "card", "iban", "ip")

#: (text, what it must become with every kind masked)
CORPUS = [
    ("write to john.doe@example.com today", "write to <EMAIL> today"),
    ("cc: Ana.Lopez+billing@mail.example.co.uk", "cc: <EMAIL>"),
    ("call +1 415-555-2671 after 5", "call <PHONE> after 5"),
    ("UK office: +44 20 7946 0958", "UK office: <PHONE>"),
    ("Berlin +49 30 901820", "Berlin <PHONE>"),
    ("visa 4111 1111 1111 1111 exp 12/29", "visa <CARD> exp 12/29"),
    ("mastercard 5555555555554444", "mastercard <CARD>"),
    ("amex 3782-822463-10005", "amex <CARD>"),
    ("IBAN DE89 3704 0044 0532 0130 00 (Commerzbank)", "IBAN <IBAN> (Commerzbank)"),
    ("pay to GB82WEST12345698765432", "pay to <IBAN>"),
    ("FR14 2004 1010 0505 0001 3M02 606", "<IBAN>"),
    ("server 192.168.10.4 is down", "server <IP> is down"),
    ("v6 peer 2001:db8::ff00:42:8329", "v6 peer <IP>"),
]

#: Look-alikes nothing may touch.
CLEAN = [
    "card 4111 1111 1111 1112 fails its checksum",
    "the meeting is on 2026-12-03 at 14:30",
    "python 3.11 and torch 2.13",
    "order #88231 shipped in 3 boxes",
    "an email address looks like name at domain",
]


@pytest.fixture(scope="module")
def redactor() -> Iterator[Redactor]:
    r = Redactor()
    yield r
    r.close()


@pytest.mark.parametrize(("text", "masked"), CORPUS)
def test_each_kind_of_personal_data_is_masked(redactor: Redactor, text: str, masked: str) -> None:
    assert redactor.mask_text(text, ALL) == masked


@pytest.mark.parametrize("text", CLEAN)
def test_look_alikes_are_left_alone(redactor: Redactor, text: str) -> None:
    assert redactor.mask_text(text, ALL) == text


def test_only_the_kinds_asked_for_are_masked(redactor: Redactor) -> None:
    text = "mail john.doe@example.com or call +1 415-555-2671 from 10.0.0.7"
    assert (
        redactor.mask_text(text, ["email"]) == "mail <EMAIL> or call +1 415-555-2671 from 10.0.0.7"
    )
    assert (
        redactor.mask_text(text, ["phone", "ip"])
        == "mail john.doe@example.com or call <PHONE> from <IP>"
    )
    assert redactor.mask_text(text, []) == text


def test_overlapping_findings_become_one_mask() -> None:
    assert merge_spans([(0, 10, "<A>"), (2, 5, "<B>"), (8, 14, "<C>"), (20, 22, "<D>")]) == [
        (0, 14, "<A>"),
        (20, 22, "<D>"),
    ]


# -- a real kernel -----------------------------------------------------------------------

SECRETS = [
    "john.doe@example.com",
    "+1 415-555-2671",
    "4111 1111 1111 1111",
    "DE89 3704 0044 0532 0130 00",
    "192.168.10.4",
]
TEXT = (
    "I am John, mail john.doe@example.com, phone +1 415-555-2671, card 4111 1111 1111 1111, "
    "IBAN DE89 3704 0044 0532 0130 00, my laptop is 192.168.10.4"
)


def _row(c: object, pid: int) -> object:
    return next(r for r in c.ps() if r.pid == pid)  # type: ignore[attr-defined]


def _raw(state: Path) -> bytes:
    """Every byte the kernel keeps on disk: the database, its WAL, segments, the log."""
    return b"".join(p.read_bytes() for p in sorted(state.rglob("*")) if p.is_file())


def test_a_redacting_process_stores_no_personal_data(tmp_path: Path) -> None:
    k = Daemon(tmp_path, "--driver", "sim").start()
    try:
        with k.admin() as c:
            p = c.spawn("clerk", system=f"You help {SECRETS[0]}.", redact=list(ALL))
            assert _row(c, p.pid).redact == sorted(ALL)
            p.append([{"role": "user", "content": TEXT}])
            p.generate(
                messages=[{"role": "user", "content": f"remember {SECRETS[1]}"}], max_tokens=4
            )
            p.memory.put(f"customer card {SECRETS[2]}")
            p.memory.set_block("human", f"reach me at {SECRETS[0]}")
            p.tools.call("memory_put", {"text": f"note {SECRETS[4]}"})
            kid = p.spawn("kid", redact=["email"])  # inherits every kind; drops none
            assert _row(c, kid.pid).redact == sorted(ALL)
            stored = "\n".join(m["content"] for m in p.context())
            assert "<EMAIL>" in stored and "<PHONE>" in stored and "<CARD>" in stored
            assert "<IBAN>" in stored and "<IP>" in stored
            assert not any(s in stored for s in SECRETS)
            assert "<EMAIL>" in p.memory.block("human")
            assert not p.memory.recall("example.com") and p.memory.recall("EMAIL")
            # Its audit row's digest is that of the masked arguments (no brute-forcing).
            rows = [r for r in c.audit(limit=1000).rows if r.actor == f"pid:{p.pid}"]
            masked = m.ToolCallArgs(name="memory_put", args={"text": "note <IP>"})
            assert any(r.call == "tool.call" and r.digest == digest(masked) for r in rows)
            with pytest.raises(EINVAL):
                c.spawn("bad", redact=["names"])  # an unknown kind is refused
    finally:
        k.stop()
    k.start()  # it still redacts after a restart
    try:
        with k.admin() as c:
            assert _row(c, p.pid).redact == sorted(ALL)
        with Client(k.endpoint, pid=p.pid, token=p.token) as again:
            again.call("ctx.append", {"messages": [{"role": "user", "content": TEXT}]})
            last = again.call("ctx.get", {"last": 1})["messages"][0]["content"]
            assert "<EMAIL>" in last and SECRETS[0] not in last
    finally:
        k.stop()
    raw = _raw(k.state_dir)
    assert not [s for s in SECRETS if s.encode() in raw]


def test_without_redact_model_only_the_stored_copy_is_masked(tmp_path: Path) -> None:
    """The simulator's greedy answer is a pure function of its prompt: the same answer
    as for the masked words proves the model was given the masked words."""
    ask = [{"role": "user", "content": f"my card is {SECRETS[2]}"}]
    masked = [{"role": "user", "content": "my card is <CARD>"}]
    k = Daemon(tmp_path, "--driver", "sim").start()
    try:
        with k.admin() as c:

            def answer(messages: list[dict[str, str]], **kw: object) -> str:
                return c.spawn("p", **kw).generate(messages=messages, max_tokens=6).text

            to_masked = answer(masked)
            assert answer(ask) != to_masked
            assert answer(ask, redact=["card"]) != to_masked  # the model saw the number
            assert answer(ask, redact=["card"], redact_model=True) == to_masked
    finally:
        k.stop()
