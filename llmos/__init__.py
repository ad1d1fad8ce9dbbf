"""llmos user space: the SDK agent programs import, the ``llmos`` command and shell.

import llmos
me = llmos.this_process()          # inside a program started by `llmos run`
print(me.chat("Hello!"))
"""

from llmos import errors
from llmos.client import (
    AsyncClient,
    AsyncProcess,
    Client,
    Process,
    aconnect,
    connect,
    spawn,
    this_process,
)
from llmos.errors import Errno, SyscallError

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncProcess",
    "Client",
    "Errno",
    "Process",
    "SyscallError",
    "aconnect",
    "connect",
    "errors",
    "spawn",
    "this_process",
]
