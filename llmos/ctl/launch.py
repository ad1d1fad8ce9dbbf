"""``python -m llmos.ctl.launch PROGRAM ARGS...``: how ``llmos run`` starts an agent
program — as ``python PROGRAM ARGS...`` would, except that Ctrl-C ends it with status 130
quietly (no KeyboardInterrupt traceback through the SDK and ZeroMQ), as a shell expects."""

from __future__ import annotations

import os
import runpy
import sys


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: python -m llmos.ctl.launch PROGRAM [ARGS...]", file=sys.stderr)
        return 2
    program = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path[0] = os.path.dirname(os.path.abspath(program))  # as `python PROGRAM` sets it
    try:
        runpy.run_path(program, run_name="__main__")
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
