"""Deliberately broken candidates, for proving that failures are isolated and recorded.

Only measure(..., faults=...) adds them; a sweep never does. Each is a real failure of the
real worker process: a signal, a hang past the timeout, or a compiled kernel whose output
is wrong.
"""

from __future__ import annotations

import os
import signal
import time

FAULT_KINDS = ("crash", "hang", "wrong", "compile_error")
PREFIX = "fault:"


def fault_id(kind: str) -> str:
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r} (expected one of {', '.join(FAULT_KINDS)})")
    return PREFIX + kind


def kind_of(candidate_id: str) -> str | None:
    return candidate_id[len(PREFIX):] if candidate_id.startswith(PREFIX) else None


def before_compile(kind: str) -> None:
    """Runs in the worker where compilation of the faulty candidate starts."""
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif kind == "hang":
        while True:
            time.sleep(3600)
    elif kind == "compile_error":
        raise RuntimeError("injected compile error (fault:compile_error)")
