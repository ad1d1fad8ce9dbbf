"""The llmos ABI: typed syscall models, error codes and the wire codec.

This package is the only contract between user space (``llmos``) and the kernel.
"""

from syscalls.errors import Errno, SyscallError
from syscalls.limits import ABI_VERSION
from syscalls.table import SYSCALLS, SyscallSpec

__all__ = ["ABI_VERSION", "SYSCALLS", "Errno", "SyscallError", "SyscallSpec"]
