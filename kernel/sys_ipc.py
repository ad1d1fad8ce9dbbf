"""ipc.* handlers: send, recv, subscribe, unsubscribe, publish, topic.create/delete.

The mechanism and the permission rule live in :mod:`kernel.ipc`; these handlers turn
timeouts into loop-time bounds (never past the call's deadline) and shape the results.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from kernel.ipc import Mailbox, Message
from kernel.syscall import Call
from syscalls import models as m

if TYPE_CHECKING:
    from kernel.kernel import Kernel

#: A blocking call gives up this long before its deadline, so it can still answer with
#: its own result (EAGAIN, no message) rather than the dispatcher's ETIMEDOUT.
DEADLINE_MARGIN_S = 0.05


def _until(call: Call, timeout: float | None) -> float:
    """Loop time a blocking call may wait until: ``timeout`` from now, or the call's
    deadline (less a margin) if that comes first or no timeout was given."""
    last = call.deadline - DEADLINE_MARGIN_S
    if timeout is None:
        return last
    return min(asyncio.get_running_loop().time() + timeout, last)


def _message(msg: Message) -> m.IpcMessage:
    return m.IpcMessage(
        id=msg.id,
        sender=msg.sender,
        program=msg.program,
        topic=msg.topic,
        sent=msg.sent,
        body=msg.body,
    )


async def sys_send(k: Kernel, call: Call, a: m.SendArgs) -> m.SendResult:
    msg, queued = await k.ipc.send(
        call.caller,
        a.pid,
        a.message,
        m.body_bytes(a.message),
        _until(call, a.timeout),
        call.origin(),
    )
    return m.SendResult(id=msg.id, pid=a.pid, queued=queued)


async def sys_recv(k: Kernel, call: Call, a: m.RecvArgs) -> m.RecvResult:
    proc = call.caller.proc
    assert proc is not None
    msg, box = await k.ipc.recv(proc, a.from_pid, a.topic, _until(call, a.timeout))
    if msg is not None:
        call.link(msg.origin, "ipc.message")  # the span of the send (or publish) it got
    return m.RecvResult(
        message=None if msg is None else _message(msg), pending=len(box), dropped=box.dropped
    )


def _subscribed(k: Kernel, topic: str, box: Mailbox) -> m.SubscribeResult:
    return m.SubscribeResult(
        topic=topic, subscribers=k.ipc.subscribers(topic), subscriptions=len(box.topics)
    )


def sys_subscribe(k: Kernel, call: Call, a: m.TopicArgs) -> m.SubscribeResult:
    proc = call.caller.proc
    assert proc is not None
    return _subscribed(k, a.topic, k.ipc.subscribe(proc, a.topic))


def sys_unsubscribe(k: Kernel, call: Call, a: m.TopicArgs) -> m.SubscribeResult:
    proc = call.caller.proc
    assert proc is not None
    return _subscribed(k, a.topic, k.ipc.unsubscribe(proc, a.topic))


def sys_topic_create(k: Kernel, call: Call, a: m.TopicCreateArgs) -> m.TopicCreateResult:
    topic, created = k.ipc.create(call.caller, a.topic, list(a.allow), a.others)
    return m.TopicCreateResult(
        topic=topic.name,
        owner=topic.owner or 0,
        allow=sorted(topic.allow),
        others=topic.others,
        created=created,
        subscribers=len(topic.subscribers),
    )


def sys_topic_delete(k: Kernel, call: Call, a: m.TopicArgs) -> m.TopicDeleteResult:
    return m.TopicDeleteResult(topic=a.topic, subscribers=k.ipc.delete(call.caller, a.topic))


def sys_publish(k: Kernel, call: Call, a: m.PublishArgs) -> m.PublishResult:
    msg, delivered, dropped = k.ipc.publish(
        call.caller, a.topic, a.message, m.body_bytes(a.message), call.origin()
    )
    return m.PublishResult(id=msg.id, delivered=delivered, dropped=dropped)


HANDLERS = {
    "ipc.send": sys_send,
    "ipc.recv": sys_recv,
    "ipc.subscribe": sys_subscribe,
    "ipc.unsubscribe": sys_unsubscribe,
    "ipc.topic.create": sys_topic_create,
    "ipc.topic.delete": sys_topic_delete,
    "ipc.publish": sys_publish,
}
