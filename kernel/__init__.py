"""The llmos kernel daemon: process table, scheduler, syscall dispatch, transport."""
