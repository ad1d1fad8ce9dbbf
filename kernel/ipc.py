"""IPC: a bounded mailbox per process, direct messages and topics (publish/subscribe).

Like xv6's pipe.c, the mechanism only: a mailbox is a FIFO of messages bounded in
count and bytes (``syscalls/limits.py``), with the receivers waiting for a message and
the senders waiting for room parked on it. Who may message whom:

* a process may send to any live process of its own program (the top-level process and
  all its descendants); the admin may send to anyone; anything else is EPERM;
* topics are kernel-wide and opt-in: a process receives a topic's messages only while
  it subscribes. A topic nobody created is *open* (anyone may publish and subscribe; it
  exists while someone subscribes). ``ipc.topic.create`` makes a topic *owned* by the
  caller's program (the admin's: program 0): only that program, the programs on its
  allow-list and the admin may publish and subscribe, and ``others`` may open one of
  the two to everyone (``subscribe``: an announcement channel; ``publish``: an inbox).
  Anything else is EPERM with a sentence. An owned topic lives until its owner deletes
  it or its program's last process exits; a name held by another owner, or an open
  topic some other program subscribes to, cannot be taken (EBUSY). Every message
  carries its sender's pid and program, so a subscriber can tell who published.

A full mailbox refuses a direct message (EAGAIN, or the sender waits for room up to
its timeout) but never slows a publisher: the subscriber's copy is dropped and its
``dropped`` counter goes up. All mailboxes together hold at most ``max_bytes``
(MAX_IPC_BYTES), so no program can fill the kernel's memory through them, and the
tables are shared out: the bytes queued are charged to the *sending* program, which
holds at most its share (its ``max_ipc_bytes`` limit, or a quarter of the pool), and
each program holds at most its share of the topic table (``max_topics``, or a quarter)
— the topics it subscribes to or owns. The last sixteenth of each is the admin's. When
a process exits its mailbox and subscriptions go with it and every sender waiting on
it is woken with ESRCH.
Mailboxes live on the kernel's loop only (no locks) and are not persisted: a kernel
restart empties them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from kernel.process import Caller, Proc, ProcessTable
from syscalls import limits
from syscalls.errors import Errno, SyscallError


@dataclass(frozen=True, slots=True)
class Message:
    """One message in flight. Immutable: a published message is shared by every
    subscriber's mailbox."""

    id: int
    sender: int  # pid, 0 for the admin
    program: int  # the sender's program id, 0 for the admin
    topic: str | None  # None: a direct message
    sent: float  # Unix seconds
    body: object  # a validated JSON value
    size: int  # bytes of its compact JSON, counted against the mailbox's byte bound
    origin: tuple[int, int] | None = None  # the sending call's span (kernel/trace.py)

    def matches(self, sender: int | None, topic: str | None) -> bool:
        return (sender is None or self.sender == sender) and (topic is None or self.topic == topic)


class Mailbox:
    """One process's incoming messages: oldest first, at most MAILBOX_MAX_MESSAGES and
    MAILBOX_MAX_BYTES."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.messages: deque[Message] = deque()
        self.bytes = 0
        self.dropped = 0  # published copies refused because the mailbox was full
        self.topics: set[str] = set()  # what its process subscribes to
        self.closed = False  # its process exited
        self._arrived: set[asyncio.Event] = set()  # receivers waiting for a message
        self._room: set[asyncio.Event] = set()  # senders waiting for room

    def __len__(self) -> int:
        return len(self.messages)

    def fits(self, size: int) -> bool:
        return (
            len(self.messages) < limits.MAILBOX_MAX_MESSAGES
            and self.bytes + size <= limits.MAILBOX_MAX_BYTES
        )

    def put(self, msg: Message) -> None:
        self.messages.append(msg)
        self.bytes += msg.size
        _wake(self._arrived)

    def take(self, sender: int | None, topic: str | None) -> Message | None:
        """Remove and return the oldest message matching the filters, if any."""
        for i, msg in enumerate(self.messages):
            if msg.matches(sender, topic):
                del self.messages[i]
                self.bytes -= msg.size
                _wake(self._room)
                return msg
        return None

    async def arrival(self, until: float) -> bool:
        """Wait until a message arrives (or the mailbox closes); False if ``until`` (loop
        time) passes first."""
        return await _park(self._arrived, until)

    async def room(self, until: float) -> bool:
        """Wait until a message leaves (or the mailbox closes); False if ``until`` passes first."""
        return await _park(self._room, until)

    def close(self) -> None:
        """Its process exited: drop the messages and wake everyone parked here."""
        self.closed = True
        self.messages.clear()
        self.bytes = 0
        _wake(self._arrived)
        _wake(self._room)


def _wake(waiters: set[asyncio.Event]) -> None:
    for event in waiters:
        event.set()


async def _park(waiters: set[asyncio.Event], until: float) -> bool:
    event = asyncio.Event()
    waiters.add(event)
    try:
        async with asyncio.timeout_at(until):
            await event.wait()
        return True
    except TimeoutError:
        return False
    finally:
        waiters.discard(event)


#: What a restricted topic lets programs outside its owner and allow-list do.
Others = Literal["none", "subscribe", "publish"]


@dataclass(eq=False)
class Topic:
    """One entry of the topic table."""

    name: str
    subscribers: set[int] = field(default_factory=set)  # pids
    owner: int | None = None  # the program that created it (0: the admin); None: open
    allow: frozenset[int] = frozenset()  # other programs that may publish and subscribe
    others: Others = "none"  # what every other program may do

    def permits(self, program: int | None, action: str) -> bool:
        """May a process of ``program`` (None: the admin) ``action`` (publish/subscribe)?"""
        return (
            program is None
            or self.owner is None
            or program == self.owner
            or program in self.allow
            or self.others == action
        )


def admin_reserve(size: int) -> int:
    """The part of a shared table only the admin may fill: its last sixteenth."""
    return max(1, size // 16)


class Ipc:
    """Every mailbox and the topic table. Mailboxes are made on first use and only for
    live processes; :meth:`close` removes a process's when it exits."""

    def __init__(
        self,
        procs: ProcessTable,
        max_bytes: int = limits.MAX_IPC_BYTES,
        max_topics: int = limits.MAX_TOPICS,
    ) -> None:
        self.procs = procs
        self.boxes: dict[int, Mailbox] = {}
        self.topics: dict[str, Topic] = {}
        self.bytes = 0  # queued in all mailboxes, bounded by max_bytes
        self.max_bytes = max_bytes
        self.max_topics = max_topics
        self.sent: dict[int, int] = {}  # program (0: admin) -> bytes of its messages queued
        self.held: dict[int, dict[str, int]] = {}  # program -> topic -> subscriptions (+1 owned)
        self._ids = itertools.count(1)

    def mailbox(self, proc: Proc) -> Mailbox:
        """``proc``'s mailbox (made now if it has none). ``proc`` must be alive."""
        box = self.boxes.get(proc.pid)
        if box is None:
            box = self.boxes[proc.pid] = Mailbox(proc.pid)
        return box

    def depth(self, pid: int) -> int:
        """Messages waiting for ``pid``."""
        box = self.boxes.get(pid)
        return 0 if box is None else len(box)

    # -- the byte pool, shared out by sending program ----------------------------------
    def _pool_full(self, caller: Caller, size: int) -> str | None:
        """Why ``caller`` may not queue ``size`` more bytes now (None: it may)."""
        if self.bytes + size > self.max_bytes:
            return f"the kernel's mailboxes hold {self.bytes} bytes, the most they may ({self.max_bytes})"
        me = caller.proc
        if me is None:
            return None
        reserve = admin_reserve(self.max_bytes)
        if self.bytes + size > self.max_bytes - reserve:
            return (
                f"the kernel's mailboxes hold {self.bytes} bytes; the last {reserve} of "
                f"{self.max_bytes} are kept for the admin"
            )
        program = me.program
        share = program.account.limits.max_ipc_bytes or max(1, self.max_bytes // 4)
        held = self.sent.get(program.pgid, 0)
        if held + size > share:
            return (
                f"program {program.pgid} has {held} bytes of messages waiting in mailboxes, "
                f"its share of the pool (max_ipc_bytes={share})"
            )
        return None

    def _put(self, box: Mailbox, msg: Message) -> None:
        box.put(msg)
        self.bytes += msg.size
        self.sent[msg.program] = self.sent.get(msg.program, 0) + msg.size

    def _gone(self, msg: Message) -> None:
        """A queued copy of ``msg`` left its mailbox (read, or its receiver exited)."""
        self.bytes -= msg.size
        left = self.sent[msg.program] - msg.size
        if left:
            self.sent[msg.program] = left
        else:
            del self.sent[msg.program]

    def _message(
        self,
        caller: Caller,
        topic: str | None,
        body: object,
        size: int,
        origin: tuple[int, int] | None,
    ) -> Message:
        program = caller.proc.program.pgid if caller.proc is not None else 0
        return Message(next(self._ids), caller.pid, program, topic, time.time(), body, size, origin)

    # -- direct messages ---------------------------------------------------------------
    def receiver(self, caller: Caller, pid: int) -> Proc:
        """The live process ``pid`` if the caller may message it: ESRCH, EPERM otherwise."""
        proc = self.procs.lookup(pid)
        if not proc.alive:
            raise SyscallError(
                Errno.ESRCH, f"process {pid} has exited; it receives no more messages"
            )
        me = caller.proc
        if me is not None and me.program.pgid != proc.program.pgid:
            raise SyscallError(
                Errno.EPERM,
                f"process {caller.pid} (program {me.program.pgid}) may not message process {pid} "
                f"of program {proc.program.pgid}: only processes of one program message "
                "each other; to reach another program, publish on a topic it subscribes to",
            )
        return proc

    async def send(
        self,
        caller: Caller,
        pid: int,
        body: object,
        size: int,
        until: float,
        origin: tuple[int, int] | None = None,
    ) -> tuple[Message, int]:
        """Queue a message for ``pid``, waiting for room until ``until`` (loop time) if its
        mailbox is full. Returns the message and the mailbox's depth. EAGAIN if it stays
        full; ESRCH if the receiver exits meanwhile."""
        box = self.mailbox(self.receiver(caller, pid))
        while not box.fits(size) or (pool := self._pool_full(caller, size)) is not None:
            full = (
                f"the mailbox of process {pid} is full ({len(box)} messages, {box.bytes} bytes; "
                f"bounds {limits.MAILBOX_MAX_MESSAGES} messages, {limits.MAILBOX_MAX_BYTES} bytes)"
                if not box.fits(size)
                else pool
            )
            if until <= asyncio.get_running_loop().time():
                raise SyscallError(
                    Errno.EAGAIN, f"{full}; try again once it reads, or send with a timeout"
                )
            woken = await box.room(until)
            if box.closed:
                raise SyscallError(
                    Errno.ESRCH, f"process {pid} exited while the message waited for room"
                )
            if not woken:
                raise SyscallError(Errno.EAGAIN, f"{full} and stayed full until the timeout")
        msg = self._message(caller, None, body, size, origin)
        self._put(box, msg)
        return msg, len(box)

    async def recv(
        self, proc: Proc, sender: int | None, topic: str | None, until: float
    ) -> tuple[Message | None, Mailbox]:
        """The oldest message for ``proc`` matching the filters, waiting until ``until``
        (loop time) for one; None if none came."""
        box = self.mailbox(proc)
        while (msg := box.take(sender, topic)) is None:
            if box.closed:
                raise SyscallError(Errno.ECANCELED, f"process {proc.pid} exited during ipc.recv")
            if until <= asyncio.get_running_loop().time() or not await box.arrival(until):
                return None, box
        self._gone(msg)
        return msg, box

    # -- topics ------------------------------------------------------------------------
    def _check(self, topic: Topic, proc: Proc | None, action: str) -> None:
        program = None if proc is None else proc.program.pgid
        if not topic.permits(program, action):
            allowed = ", ".join(str(p) for p in sorted(topic.allow)) or "none"
            owner = "the admin" if topic.owner == 0 else f"program {topic.owner}"
            raise SyscallError(
                Errno.EPERM,
                f"topic {topic.name!r} belongs to {owner}: process {proc.pid if proc else 0} "
                f"(program {program}) may not {action} on it (other programs allowed: "
                f"{allowed}; everyone else may {topic.others if topic.others != 'none' else 'do nothing'})",
            )

    def _room_for_topic(self, proc: Proc | None, name: str) -> None:
        """EAGAIN unless ``proc``'s program (None: the admin) may hold one more topic."""
        new = name not in self.topics
        if new and len(self.topics) >= self.max_topics:
            raise SyscallError(
                Errno.EAGAIN, f"the kernel's topic table is full ({self.max_topics} topics)"
            )
        if proc is None:
            return
        reserve = admin_reserve(self.max_topics)
        if new and len(self.topics) >= self.max_topics - reserve:
            raise SyscallError(
                Errno.EAGAIN,
                f"the topic table holds {len(self.topics)} topics; the last {reserve} of "
                f"{self.max_topics} are kept for the admin",
            )
        program = proc.program
        held = self.held.get(program.pgid, {})
        share = program.account.limits.max_topics or max(1, self.max_topics // 4)
        if name not in held and len(held) >= share:
            raise SyscallError(
                Errno.EAGAIN,
                f"program {program.pgid} holds {len(held)} topics (subscribed or owned), its "
                f"share of the topic table (max_topics={share}); unsubscribe from some first",
            )

    def _hold(self, program: int, name: str, n: int) -> None:
        held = self.held.setdefault(program, {})
        count = held.get(name, 0) + n
        if count > 0:
            held[name] = count
            return
        held.pop(name, None)
        if not held:
            del self.held[program]

    def _drop_if_unused(self, topic: Topic) -> None:
        if topic.owner is None and not topic.subscribers:
            self.topics.pop(topic.name, None)

    def create(
        self, caller: Caller, name: str, allow: list[int], others: Others
    ) -> tuple[Topic, bool]:
        """Make ``name`` a topic owned by the caller's program (the admin's: 0), usable by
        the programs in ``allow`` and, for ``others``, by everyone. Again by its owner:
        the rules change (subscribers they no longer admit are unsubscribed). Returns the
        topic and whether it is new."""
        me = caller.proc
        owner = 0 if me is None else me.program.pgid
        topic = self.topics.get(name)
        if topic is not None and topic.owner is not None and topic.owner != owner:
            holder = "the admin" if topic.owner == 0 else f"program {topic.owner}"
            raise SyscallError(
                Errno.EBUSY, f"topic {name!r} belongs to {holder}; pick another name"
            )
        rules = Topic(name, owner=owner, allow=frozenset(allow) - {owner}, others=others)
        if topic is not None and topic.owner is None:
            strangers = {
                self.procs.lookup(pid).program.pgid
                for pid in topic.subscribers
                if not rules.permits(self.procs.lookup(pid).program.pgid, "subscribe")
            }
            if strangers:
                raise SyscallError(
                    Errno.EBUSY,
                    f"topic {name!r} is open and programs {sorted(strangers)} subscribe to it: "
                    "it cannot be taken from them; pick another name",
                )
        if topic is None or topic.owner is None:
            self._room_for_topic(me, name)
        fresh = topic is None or topic.owner is None
        if topic is None:
            topic = self.topics[name] = rules
        else:
            topic.owner, topic.allow, topic.others = rules.owner, rules.allow, rules.others
        if fresh and me is not None:
            self._hold(owner, name, 1)
        for pid in list(topic.subscribers):  # a changed rule may shut some out
            if not topic.permits(self.procs.lookup(pid).program.pgid, "subscribe"):
                self._unsubscribe(self.boxes[pid], topic)
        return topic, fresh

    def delete(self, caller: Caller, name: str) -> int:
        """Remove owned topic ``name`` (its owner's processes or the admin); its
        subscribers lose it. Returns how many subscribed."""
        topic = self.topics.get(name)
        if topic is None or topic.owner is None:
            raise SyscallError(Errno.ENOENT, f"no topic {name!r} was made with ipc.topic.create")
        me = caller.proc
        if me is not None and me.program.pgid != topic.owner:
            raise SyscallError(
                Errno.EPERM,
                f"topic {name!r} belongs to program {topic.owner}: only its processes or the "
                "admin delete it",
            )
        return self._delete(topic)

    def _delete(self, topic: Topic) -> int:
        subscribed = len(topic.subscribers)
        for pid in list(topic.subscribers):
            self._unsubscribe(self.boxes[pid], topic)
        if topic.owner:
            self._hold(topic.owner, topic.name, -1)
        self.topics.pop(topic.name, None)
        return subscribed

    def subscribe(self, proc: Proc, name: str) -> Mailbox:
        """Deliver ``name``'s messages to ``proc`` from now on (again: no change)."""
        box = self.mailbox(proc)
        if name in box.topics:
            return box
        topic = self.topics.get(name)
        if topic is not None:
            self._check(topic, proc, "subscribe")
        if len(box.topics) >= limits.MAX_SUBSCRIPTIONS:
            raise SyscallError(
                Errno.EAGAIN,
                f"process {proc.pid} already subscribes to "
                f"{limits.MAX_SUBSCRIPTIONS} topics, the most a process may; unsubscribe first",
            )
        self._room_for_topic(proc, name)
        if topic is None:
            topic = self.topics[name] = Topic(name)
        box.topics.add(name)
        topic.subscribers.add(proc.pid)
        self._hold(proc.program.pgid, name, 1)
        return box

    def unsubscribe(self, proc: Proc, name: str) -> Mailbox:
        """Stop delivering ``name`` to ``proc`` (ENOENT if it did not subscribe)."""
        box = self.boxes.get(proc.pid)
        if box is None or name not in box.topics:
            raise SyscallError(
                Errno.ENOENT, f"process {proc.pid} does not subscribe to topic {name!r}"
            )
        self._unsubscribe(box, self.topics[name])
        return box

    def _unsubscribe(self, box: Mailbox, topic: Topic) -> None:
        box.topics.discard(topic.name)
        if box.pid in topic.subscribers:
            topic.subscribers.discard(box.pid)
            self._hold(self.procs.lookup(box.pid).program.pgid, topic.name, -1)
        self._drop_if_unused(topic)

    def subscribers(self, name: str) -> int:
        topic = self.topics.get(name)
        return 0 if topic is None else len(topic.subscribers)

    def publish(
        self,
        caller: Caller,
        name: str,
        body: object,
        size: int,
        origin: tuple[int, int] | None = None,
    ) -> tuple[Message, int, int]:
        """Put a copy in every subscriber's mailbox now; a full one (or a publisher over
        its share of the byte pool) drops it, counted. Never waits. Returns the message,
        how many got it and how many dropped it."""
        topic = self.topics.get(name)
        if topic is not None:
            self._check(topic, caller.proc, "publish")
        msg = self._message(caller, name, body, size, origin)
        delivered = dropped = 0
        for pid in topic.subscribers if topic is not None else ():
            box = self.boxes[pid]
            if box.fits(size) and self._pool_full(caller, size) is None:
                self._put(box, msg)
                delivered += 1
            else:
                box.dropped += 1
                dropped += 1
        return msg, delivered, dropped

    # -- exit --------------------------------------------------------------------------
    def close(self, pid: int) -> None:
        """``pid`` exited: its messages and subscriptions vanish; senders waiting on its
        mailbox get ESRCH. The topics its program owns go with the program's last
        live process."""
        box = self.boxes.pop(pid, None)
        if box is not None:
            for name in list(box.topics):
                self._unsubscribe(box, self.topics[name])
            for msg in box.messages:
                self._gone(msg)
            box.close()
        proc = self.procs.get(pid)
        if proc is None:
            return
        program = proc.program.pgid
        owned = [t for t in self.topics.values() if t.owner == program and program]
        if owned and not any(p.alive and p.program is proc.program for p in self.procs):
            for topic in owned:
                self._delete(topic)
