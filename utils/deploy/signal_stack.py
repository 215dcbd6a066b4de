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
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    before, now = _SignalStack(), _SignalStack()
    known = libc.sigaltstack(None, ctypes.byref(before)) == 0
    try:
        yield
    finally:
        if known and libc.sigaltstack(None, ctypes.byref(now)) == 0 and \
                (now.ss_sp, now.ss_size) != (before.ss_sp, before.ss_size):
            before.ss_flags &= _SS_DISABLE  # SS_ONSTACK is reported, never set
            libc.sigaltstack(ctypes.byref(before), None)
