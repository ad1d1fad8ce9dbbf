"""Memory syscalls against the real kernel: core blocks, recall, archival search with the
real embedding model, namespaces and grants, context windows, snapshots and fork."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from llmos.client import Client, Process
from syscalls.errors import ERRORS, Errno, SyscallError
from tests.conftest import GREEDY

pytestmark = pytest.mark.model

E2BIG, EACCES, EDQUOT, ENOENT = (
    ERRORS[e] for e in (Errno.E2BIG, Errno.EACCES, Errno.EDQUOT, Errno.ENOENT)
)

Spawn = Callable[..., Process]


def test_core_memory_blocks_are_edited_and_placed_in_the_prompt(spawn: Spawn) -> None:
    p = spawn("blocks", system="You are terse.")
    before = p.generate(
        [{"role": "user", "content": "Hi"}], max_tokens=1, **GREEDY
    ).usage.prompt_tokens
    p.clear()
    p.memory.set_block("user", "Name: Ada Lovelace. Likes: analytical engines.")
    p.memory.append_block("user", "Lives in London.")
    block = p.memory.replace_block("user", "London", "Marylebone, London")
    assert (
        block.value
        == "Name: Ada Lovelace. Likes: analytical engines.\nLives in Marylebone, London."
    )
    assert p.memory.blocks() == {"user": block.value}
    after = p.generate(
        [{"role": "user", "content": "Hi"}], max_tokens=1, **GREEDY
    ).usage.prompt_tokens
    assert after > before + 10  # the block's tokens are in the prompt now
    p.memory.delete_block("user")
    with pytest.raises(ENOENT):
        p.memory.block("user")


def test_block_limits_are_enforced_with_clear_errors(spawn: Spawn) -> None:
    p = spawn("blocklimits")
    p.memory.set_block("notes", "x" * 10, max_chars=20)
    with pytest.raises(E2BIG, match="limit is 20"):
        p.memory.append_block("notes", "y" * 20)
    with pytest.raises(ENOENT, match="does not contain"):
        p.memory.replace_block("notes", "zzz", "a")
    for i in range(15):
        p.memory.set_block(f"b{i}", "v")
    with pytest.raises(EDQUOT, match="16 blocks"):
        p.memory.set_block("one-too-many", "v")


def test_recall_finds_every_message_seen_by_words_time_and_role(spawn: Spawn) -> None:
    p = spawn("recall", system="Be brief.")
    t0 = time.time()
    p.append(
        [
            {"role": "user", "content": "My parrot is called Quetzalcoatl."},
            {"role": "assistant", "content": "Noted, a fine name."},
        ]
    )
    p.generate([{"role": "user", "content": "What colour are bananas?"}], max_tokens=8, **GREEDY)
    hits = p.memory.recall("parrot Quetzalcoatl")
    assert hits and "Quetzalcoatl" in hits[0].content and hits[0].pid == p.pid
    assert [h.role for h in p.memory.recall("bananas", role="user")] == ["user"]
    newest = p.memory.recall(k=2)
    assert newest[0].role == "assistant" and "bananas" in newest[1].content  # newest first
    assert p.memory.recall("parrot", until=t0 - 1) == []
    assert p.memory.recall("'; DROP TABLE recall; --") == []  # words, not SQL or FTS syntax


def test_archival_search_finds_paraphrases_and_filters_by_metadata(spawn: Spawn) -> None:
    p = spawn("archival")
    ids = p.memory.put(
        ("The cat sat on the mat all afternoon.", {"topic": "pets"}),
        ("Stock markets fell sharply after the announcement.", {"topic": "finance"}),
        ("Our refund policy allows returns within 30 days.", {"topic": "policy", "v": 2}),
    )
    hits = p.memory.search("A feline was resting on a rug", k=3)
    assert hits[0].id == ids[0] and hits[0].score > hits[1].score
    assert p.memory.search("can I send an item back for my money?", k=1)[0].id == ids[2]
    only = p.memory.search("cat", k=3, filter={"topic": "finance"})
    assert [h.id for h in only] == [ids[1]]
    assert p.memory.search("cat", filter={"v": 2})[0].metadata == {"topic": "policy", "v": 2}
    assert [e.text for e in p.memory.get(ids[1])] == [
        "Stock markets fell sharply after the announcement."
    ]
    assert p.memory.delete(ids[0], 999_999) == 1
    assert ids[0] not in [h.id for h in p.memory.search("cat on a mat", k=3)]


def test_namespaces_isolate_processes_and_programs_share_one(spawn: Spawn) -> None:
    a, b = spawn("ns-a"), spawn("ns-b")
    a.memory.put("secret plans of A")
    a.memory.set_block("persona", "A's persona")
    for call in (
        lambda: b.memory_of(f"pid:{a.pid}").search("plans"),
        lambda: b.memory_of(f"pid:{a.pid}").blocks(),
        lambda: b.memory_of(f"pid:{a.pid}").recall(),
        lambda: b.memory_of(f"prog:{a.pid}").put("graffiti"),
    ):
        with pytest.raises(EACCES, match="no access"):
            call()
    assert b.memory.search("plans") == []  # b's own namespace has nothing of a's
    child = a.spawn("ns-a-child")
    shared = a.memory_of(f"prog:{a.pid}")
    shared.put("the program's shared fact")
    assert (
        child.memory_of(f"prog:{a.pid}").search("shared fact")[0].text
        == "the program's shared fact"
    )
    with pytest.raises(EACCES):  # a child does not read its parent's own namespace
        child.memory_of(f"pid:{a.pid}").search("plans")


def test_grants_give_read_or_write_access_and_can_be_revoked(spawn: Spawn) -> None:
    a, b = spawn("grant-a"), spawn("grant-b")
    a.memory.put("the launch code is tomato")
    a.memory.grant(b.pid)  # read-only
    view = b.memory_of(f"pid:{a.pid}")
    assert "tomato" in view.search("launch code")[0].text
    with pytest.raises(EACCES, match="only read"):
        view.put("b was here")
    a.memory.grant(b.pid, write=True)
    view.put("b was here")
    with pytest.raises(EACCES, match="does not own"):  # b cannot re-share what it was lent
        b.call("mem.grant", {"namespace": f"pid:{a.pid}", "pid": b.pid})
    a.memory.revoke(b.pid)
    with pytest.raises(EACCES):
        view.search("launch code")


def test_truncate_policy_moves_old_turns_to_recall_and_keeps_the_system_prompt(
    spawn: Spawn,
) -> None:
    p = spawn("trunc", system="You are a helpful assistant.", ctx_window=256, ctx_policy="truncate")
    for i in range(6):
        p.generate(
            [
                {
                    "role": "user",
                    "content": f"Fact {i}: the code word number {i} is aardvark{i}. " * 3,
                }
            ],
            max_tokens=16,
            **GREEDY,
        )
    info = p.context_info()
    assert info.evicted > 0
    assert (
        info.messages[0].role == "system"
        and info.messages[0].content == "You are a helpful assistant."
    )
    assert info.messages[1].role == "user"  # never starts with a dangling assistant turn
    assert p.memory.recall("aardvark0")  # what left the window is still in recall
    assert "aardvark0" not in " ".join(m.content for m in info.messages)


def test_summarize_policy_keeps_a_running_summary_written_by_the_model(spawn: Spawn) -> None:
    p = spawn("summ", ctx_window=320, ctx_policy="summarize")
    for i in range(5):
        p.generate(
            [{"role": "user", "content": f"Remember this: my favourite number is {40 + i}. " * 4}],
            max_tokens=16,
            **GREEDY,
        )
    info = p.context_info()
    assert info.evicted > 0 and info.summary
    assert any(h.role == "system" and info.summary in h.content for h in p.memory.recall(k=50))
    ps = [r for r in p.ps() if r.pid == p.pid][0]
    assert ps.output_tokens > 5 * 16 - 1 or ps.generate_calls == 5  # summaries are charged too


def test_error_policy_refuses_an_overflowing_prompt(spawn: Spawn) -> None:
    p = spawn("strict", ctx_window=128, ctx_policy="error")
    with pytest.raises(E2BIG, match="window is 128"):
        p.generate([{"role": "user", "content": "word " * 300}], max_tokens=4, **GREEDY)
    assert p.context() == []  # untouched


def test_snapshot_restore_and_fork_copy_contexts(spawn: Spawn) -> None:
    p = spawn("snap", system="S")
    p.append([{"role": "user", "content": "one"}])
    info = p.snapshot("first")
    assert info.messages == 2
    p.append([{"role": "user", "content": "two"}])
    assert [s.name for s in p.snapshots()] == ["first"]
    assert p.restore("first") == 2
    assert [m["content"] for m in p.context()] == ["S", "one"]
    with pytest.raises(ENOENT, match="no snapshot"):
        p.restore("nope")
    child = p.fork("snap-child")
    assert [m["content"] for m in child.context()] == ["S", "one"]
    child.append([{"role": "user", "content": "only in the child"}])
    assert len(p.context()) == 2  # a copy, not a share


def test_bad_memory_arguments_get_einval(admin: Client, spawn: Spawn) -> None:
    p = spawn("badmem")
    for name, args in [
        ("mem.put", {"entries": []}),
        ("mem.put", {"entries": [{"text": "x", "metadata": {"k": [1, 2]}}]}),
        ("mem.search", {"query": "x", "k": 0}),
        ("mem.search", {"query": "x", "namespaces": ["../etc"]}),
        ("mem.block.set", {"label": "bad label!", "value": "v"}),
        ("ctx.snapshot", {"name": ""}),
    ]:
        with pytest.raises(SyscallError) as err:
            p.call(name, args)
        assert err.value.code == "EINVAL", (name, args)
    with pytest.raises(SyscallError, match="admin must name the namespace"):
        admin.call("mem.search", {"query": "x"})
    assert admin.memory(f"pid:{p.pid}").search("anything") == []  # the admin may look anywhere


def test_memory_tools_validate_model_arguments_and_act_as_the_caller(spawn: Spawn) -> None:
    """The MemGPT-style memory tools are kernel built-ins: a model (or the Agent loop)
    calls them through tool.call and they act on the caller's own memory."""
    p = spawn("memtools")
    tools = {t.name: t for t in p.tools.list()}
    assert tools["memory_search"].parameters["required"] == ["query"]
    assert tools["memory_block_append"].parameters["required"] == ["label", "text"]
    added = p.tools.call("memory_block_append", {"label": "user", "text": "Likes tea."})
    assert added == {"label": "user", "value": "Likes tea.", "max_chars": 2000}
    p.tools.call("memory_block_append", {"label": "user", "text": "Lives in Oslo."})
    p.tools.call("memory_block_replace", {"label": "user", "old": "tea", "new": "coffee"})
    assert p.memory.blocks() == {"user": "Likes coffee.\nLives in Oslo."}
    with pytest.raises(SyscallError) as err:  # the syscall's own error comes through
        p.tools.call("memory_block_replace", {"label": "user", "old": "cocoa", "new": "x"})
    assert err.value.code == "ENOENT"
    assert isinstance(p.tools.call("memory_put", {"text": "The office closes at 6 pm."})["id"], int)
    hits = p.tools.call("memory_search", {"query": "what time does it shut?"})["hits"]
    assert "6 pm" in hits[0]["text"]
    p.append([{"role": "user", "content": "I was born in Reykjavik."}])
    recalled = p.tools.call("memory_recall_search", {"query": "born"})["hits"]
    assert {"role": "user", "content": "I was born in Reykjavik."} in recalled
    other = spawn("other")  # the tools act on the caller's namespace, not someone else's
    assert other.tools.call("memory_recall_search", {"query": "born"})["hits"] == []
    assert other.memory.blocks() == {}
    for name, args in [
        ("memory_search", {"query": ""}),
        ("memory_search", {"query": "x", "k": 0}),
        ("memory_block_append", {"label": "x"}),
        ("memory_block_append", {"label": "bad label!", "text": "v"}),
        ("memory_block_replace", {"label": "user", "old": "", "new": "x"}),
        ("memory_recall_search", {"query": 42}),
    ]:
        with pytest.raises(SyscallError) as err:
            p.tools.call(name, args)
        assert err.value.code == "EINVAL", (name, args)
