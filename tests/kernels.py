"""Test helpers: a real kernel daemon for integration tests."""

from __future__ import annotations

from llmos.ctl.private import PrivateKernel


class Daemon(PrivateKernel):
    """A real kernel daemon for integration tests (see :class:`llmos.ctl.private.PrivateKernel`)."""
