"""The error classes agent programs catch: one per code, all :class:`SyscallError`.

    from llmos.errors import ESRCH, ETIMEDOUT, SyscallError

(A re-export of the contract's ``syscalls.errors``: the same classes, not copies.)
"""

from syscalls.errors import ERRORS, Errno, SyscallError

globals().update({code.value: cls for code, cls in ERRORS.items()})

__all__ = ["ERRORS", "Errno", "SyscallError", *(code.value for code in Errno)]
