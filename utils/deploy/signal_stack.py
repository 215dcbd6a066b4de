"""The calling thread's signal stack (sigaltstack), kept across calls into a library that swaps it."""
from __future__ import annotations

import contextlib
import ctypes
import sys
from typing import Iterator


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]  # Linux


_SS_DISABLE = 2


def current() -> tuple[int | None, int, int] | None:
    """(address, size, flags) of the calling thread's signal stack; None where it cannot be read (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    s = _SignalStack()
    if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(s)) != 0:
        return None
    return s.ss_sp, s.ss_size, s.ss_flags


@contextlib.contextmanager
def same_signal_stack() -> Iterator[None]:
    """Leave the calling thread on the signal stack it had before OpenVINO ran.

    Why: OpenVINO's CPU plugin gives the thread that compiles a model a signal stack of its own (sigaltstack)
    and, when its Core is destroyed, puts back the stack it found. Cores destroyed in another order than they
    were made put back a stack that is already unmapped; the next Python signal handler on that thread (Ctrl-C,
    the SIGCHLD handler of a DataLoader with workers) then kills the process with SIGSEGV, or writes its frame
    into whatever memory now lies there. With the thread's own stack put back here, a Core never finds its stack
    in place at destruction, so it leaves the thread's alone."""
    before = current()
    try:
        yield
    finally:
        now = current()
        if before is not None and now is not None and now[:2] != before[:2]:
            sp, size, flags = before
            stack = _SignalStack(sp, flags & _SS_DISABLE, size)  # SS_ONSTACK is reported, never set
            ctypes.CDLL(None).sigaltstack(ctypes.byref(stack), None)
