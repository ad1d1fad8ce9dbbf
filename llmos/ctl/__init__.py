"""The operator's room: the ``llmos`` command, the shell, ``top``, private kernels and the
benchmarks. The only user-space code allowed to import ``kernel/`` and ``drivers/``; the
SDK (``llmos``) never imports it."""
