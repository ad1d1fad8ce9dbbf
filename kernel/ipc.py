"""IPC: a bounded mailbox per process, direct messages and topics (publish/subscribe).

Like xv6's pipe.c, the mechanism only: a mailbox is a FIFO of messages bounded in
count and bytes (``syscalls/limits.py``), with the receivers waiting for a message and
the senders waiting for room parked on it. Who may message whom:

* a process may send to any live process of its own program (the top-level process and
  all its descendants); the admin may send to anyone; anything else is EPERM;
* topics are kernel-wide and opt-in: anyone may publish, a process receives a topic's
  messages only while it subscribes. Every message carries its sender's pid and
  program, so a subscriber can tell who published.

A full mailbox refuses a direct message (EAGAIN, or the sender waits for room up to
its timeout) but never slows a publisher: the subscriber's copy is dropped and its
``dropped`` counter goes up. All mailboxes together hold at most MAX_IPC_BYTES, so no
program can fill the kernel's memory through them. When a process exits its mailbox
and subscriptions go with it and every sender waiting on it is woken with ESRCH.
Mailboxes live on the kernel's loop only (no locks) and are not persisted: a kernel
restart empties them.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import dataclass

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


class Ipc:
    """Every mailbox and the topic table. Mailboxes are made on first use and only for
    live processes; :meth:`close` removes a process's when it exits."""

    def __init__(self, procs: ProcessTable) -> None:
        self.procs = procs
        self.boxes: dict[int, Mailbox] = {}
        self.topics: dict[str, set[int]] = {}  # topic -> subscriber pids (never empty)
        self.bytes = 0  # queued in all mailboxes, bounded by MAX_IPC_BYTES
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

    def _fits(self, box: Mailbox, size: int) -> bool:
        return box.fits(size) and self.bytes + size <= limits.MAX_IPC_BYTES

    def _put(self, box: Mailbox, msg: Message) -> None:
        box.put(msg)
        self.bytes += msg.size

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
        while not self._fits(box, size):
            full = (
                f"the mailbox of process {pid} is full ({len(box)} messages, {box.bytes} bytes; "
                f"bounds {limits.MAILBOX_MAX_MESSAGES} messages, {limits.MAILBOX_MAX_BYTES} bytes)"
                if not box.fits(size)
                else f"the kernel's mailboxes hold {self.bytes} bytes, the most they may "
                f"({limits.MAX_IPC_BYTES})"
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
        self.bytes -= msg.size
        return msg, box

    # -- topics ------------------------------------------------------------------------
    def subscribe(self, proc: Proc, topic: str) -> Mailbox:
        """Deliver ``topic``'s messages to ``proc`` from now on (again: no change)."""
        box = self.mailbox(proc)
        if topic in box.topics:
            return box
        if len(box.topics) >= limits.MAX_SUBSCRIPTIONS:
            raise SyscallError(
                Errno.EAGAIN,
                f"process {proc.pid} already subscribes to "
                f"{limits.MAX_SUBSCRIPTIONS} topics, the most a process may; unsubscribe first",
            )
        if topic not in self.topics and len(self.topics) >= limits.MAX_TOPICS:
            raise SyscallError(
                Errno.EAGAIN, f"the kernel's topic table is full ({limits.MAX_TOPICS} topics)"
            )
        box.topics.add(topic)
        self.topics.setdefault(topic, set()).add(proc.pid)
        return box

    def unsubscribe(self, proc: Proc, topic: str) -> Mailbox:
        """Stop delivering ``topic`` to ``proc`` (ENOENT if it did not subscribe)."""
        box = self.boxes.get(proc.pid)
        if box is None or topic not in box.topics:
            raise SyscallError(
                Errno.ENOENT, f"process {proc.pid} does not subscribe to topic {topic!r}"
            )
        box.topics.discard(topic)
        self._forget(topic, proc.pid)
        return box

    def subscribers(self, topic: str) -> int:
        return len(self.topics.get(topic, ()))

    def _forget(self, topic: str, pid: int) -> None:
        pids = self.topics.get(topic)
        if pids is not None:
            pids.discard(pid)
            if not pids:
                del self.topics[topic]

    def publish(
        self,
        caller: Caller,
        topic: str,
        body: object,
        size: int,
        origin: tuple[int, int] | None = None,
    ) -> tuple[Message, int, int]:
        """Put a copy in every subscriber's mailbox now; a full one drops it (and counts
        it). Never waits. Returns the message, how many got it and how many dropped it."""
        msg = self._message(caller, topic, body, size, origin)
        delivered = dropped = 0
        for pid in self.topics.get(topic, ()):
            box = self.boxes[pid]
            if self._fits(box, size):
                self._put(box, msg)
                delivered += 1
            else:
                box.dropped += 1
                dropped += 1
        return msg, delivered, dropped

    # -- exit --------------------------------------------------------------------------
    def close(self, pid: int) -> None:
        """``pid`` exited: its messages and subscriptions vanish; senders waiting on its
        mailbox get ESRCH."""
        box = self.boxes.pop(pid, None)
        if box is None:
            return
        for topic in box.topics:
            self._forget(topic, pid)
        self.bytes -= box.bytes
        box.close()
