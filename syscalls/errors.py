"""Error codes: errno-style names, each with the sentence a user reads.

Errors cross the wire as ``{"code": "EINVAL", "message": "..."}``; the SDK raises them
as :class:`SyscallError` (and subclasses per code), never as bare tracebacks.
"""

from __future__ import annotations

from enum import StrEnum


class Errno(StrEnum):
    """Every error code a syscall can return."""

    EINVAL = "EINVAL"
    ENOSYS = "ENOSYS"
    EPERM = "EPERM"
    EACCES = "EACCES"
    ESRCH = "ESRCH"
    ENOENT = "ENOENT"
    ETIMEDOUT = "ETIMEDOUT"
    EAGAIN = "EAGAIN"
    ECHILD = "ECHILD"
    E2BIG = "E2BIG"
    EPROTO = "EPROTO"
    EPROTONOSUPPORT = "EPROTONOSUPPORT"
    ECANCELED = "ECANCELED"
    EBUSY = "EBUSY"
    EIO = "EIO"
    ESHUTDOWN = "ESHUTDOWN"
    ECONNREFUSED = "ECONNREFUSED"
    EDQUOT = "EDQUOT"
    EROFS = "EROFS"
    EFBIG = "EFBIG"
    ENOTSUP = "ENOTSUP"

    @property
    def sentence(self) -> str:
        """The generic human meaning of this code."""
        return _SENTENCES[self]


_SENTENCES: dict[Errno, str] = {
    Errno.EINVAL: "invalid argument",
    Errno.ENOSYS: "no such syscall",
    Errno.EPERM: "operation not permitted on that process",
    Errno.EACCES: "bad credentials (wrong or missing pid/token)",
    Errno.ESRCH: "no such process",
    Errno.ENOENT: "no such object",
    Errno.ETIMEDOUT: "the call's deadline passed",
    Errno.EAGAIN: "resource temporarily unavailable, try again",
    Errno.ECHILD: "no child process to wait for",
    Errno.E2BIG: "argument or frame too large",
    Errno.EPROTO: "malformed frame",
    Errno.EPROTONOSUPPORT: "unsupported ABI version",
    Errno.ECANCELED: "the call was cancelled (its process was killed or stopped)",
    Errno.EBUSY: "the process is busy with another call",
    Errno.EIO: "the model driver or the kernel failed (see the kernel log)",
    Errno.ESHUTDOWN: "the kernel is shutting down",
    Errno.ECONNREFUSED: "no kernel answers at that endpoint",
    Errno.EDQUOT: "a quota (limit set at spawn) is exhausted",
    Errno.EROFS: "the file is on a read-only mount",
    Errno.EFBIG: "the file would be larger than the kernel allows",
    Errno.ENOTSUP: "the model's driver does not support that option",
}


class SyscallError(Exception):
    """A syscall failed. ``code`` is an :class:`Errno`; ``message`` says what and why."""

    def __init__(self, code: Errno | str, message: str = "", text: str | None = None) -> None:
        self.code = Errno(code)
        self.message = message or self.code.sentence
        self.text = text  # a generation's text so far, when one ended early (ECANCELED)
        super().__init__(f"[{self.code}] {self.message}")

    def to_wire(self) -> dict[str, str]:
        """The error as it travels in a reply frame."""
        wire = {"code": str(self.code), "message": self.message}
        if self.text is not None:
            wire["text"] = self.text
        return wire

    @staticmethod
    def of(code: Errno | str, message: str = "", text: str | None = None) -> SyscallError:
        """The typed exception for ``code`` (e.g. ``ERRORS["ESRCH"]``), so callers can
        ``except errors.ESRCH``."""
        return ERRORS[Errno(code)](code, message, text)

    @classmethod
    def from_wire(cls, error: object) -> SyscallError:
        """Rebuild an error from a reply frame; a malformed one becomes EPROTO."""
        if isinstance(error, dict):
            code, message = error.get("code"), error.get("message")
            text = error.get("text")
            if isinstance(code, str) and code in Errno.__members__ and isinstance(message, str):
                return cls.of(code, message, text if isinstance(text, str) else None)
        return cls.of(Errno.EPROTO, f"kernel sent a malformed error: {error!r:.200}")


#: One exception class per code, all subclasses of :class:`SyscallError`.
ERRORS: dict[Errno, type[SyscallError]] = {
    code: type(code.value, (SyscallError,), {"__doc__": code.sentence, "__module__": __name__})
    for code in Errno
}
globals().update({code.value: cls for code, cls in ERRORS.items()})
