"""Shares of one piece of work run in forked child processes, their messages and results streamed back.

Why: for thousands of small files the downloader is bound by the Python work of its one loop thread, and threads
do not help (they share one GIL). Two processes on two cores fetch 2,000 x 64 KiB files 1.2-1.6x faster than one
(bench/downloads.py). Why fork, not multiprocessing's spawn or forkserver: a fresh interpreter importing pycurl
takes ~0.1 s before its first request, a fifth of a whole 2,000-file run here, and a child needs the parent's state
(tasks, the folder listing, the imported engine) which fork gives for nothing. It is safe because the child runs only
the downloader's own code (pycurl, os, hashlib and threads of its own), logs and imports nothing, and leaves with
os._exit: no atexit handler, finaliser or buffered output of the parent runs twice. multiprocessing's `Connection`
carries the messages (pickled, length-framed) over a pipe per child.

A child dies with its parent (PR_SET_PDEATHSIG), ignores Ctrl+C (the terminal sends it to the whole process group:
the parent decides), and one that ends without a result - killed, crashed, raised - becomes a `WorkerLost` naming
why, so that the caller can fail exactly that share's work. Plain Python: nothing here imports Dagster.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import sys
import warnings
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any, TypeVar

Share = TypeVar("Share")
Result = TypeVar("Result")
Send = Callable[[Any], None]  # a message from a child to the parent's `on_message`

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_libc = ctypes.CDLL(None, use_errno=True)


def available() -> bool:
    """Linux only: elsewhere fork without exec is either missing (Windows) or unsafe (macOS system libraries)."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


@dataclass(frozen=True)
class WorkerLost:
    """A child that ended without a result, and why."""

    pid: int
    reason: str

    def __str__(self) -> str:
        return f"the worker process {self.pid} {self.reason}"


def run_forked(
    shares: list[Share], work: Callable[[Share, Send], Result], on_message: Callable[[Any], None]
) -> list[Result | WorkerLost]:
    """`work(share, send)` for each share in a child of its own; their results, in share order.

    Messages a child sends reach `on_message` in this process while the children run. If this process is
    interrupted (or `on_message` raises), every child still running is killed before the exception goes on.
    """
    outcomes: list[Result | WorkerLost | None] = [None] * len(shares)
    running: dict[Connection, tuple[int, int]] = {}  # reader -> (share index, pid)
    parent = os.getpid()
    try:
        for index, share in enumerate(shares):
            reader, writer = Pipe(duplex=False)
            try:
                with warnings.catch_warnings():  # Python >= 3.12 warns of fork in a threaded process: see the docstring
                    warnings.simplefilter("ignore", DeprecationWarning)
                    pid = os.fork()
            except OSError:  # no process to be had (EAGAIN, ENOMEM): the children started so far are killed below
                reader.close()
                writer.close()
                raise
            if pid == 0:
                _child(work, share, writer, parent)  # never returns
            writer.close()
            running[reader] = (index, pid)
        while running:
            for reader in wait(list(running)):
                index, pid = running[reader]
                try:
                    kind, value = reader.recv()
                except EOFError:  # the child has gone: reap it
                    del running[reader]
                    reader.close()
                    status = os.waitpid(pid, 0)[1]
                    if outcomes[index] is None:
                        outcomes[index] = WorkerLost(pid, f"ended without a result ({_ended(status)})")
                    continue
                if kind == "message":
                    on_message(value)
                elif kind == "result":
                    outcomes[index] = value
                else:
                    outcomes[index] = WorkerLost(pid, f"failed: {value}")
    finally:
        for reader, (_, pid) in running.items():  # left only when interrupted
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            reader.close()
    return outcomes  # type: ignore[return-value]  # every share has its outcome once no child runs


def _child(work: Callable[[Share, Send], Result], share: Share, writer: Connection, parent: int) -> None:
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above took effect
            return
        # the parent's objects (all of Dagster's, in a run) are never garbage here: the collector leaves them alone
        # instead of walking them, and copying every page it touches, at each full collection
        gc.freeze()
        result = work(share, lambda message: writer.send(("message", message)))
        writer.send(("result", result))
        code = 0
    except BaseException as exc:  # reported to the parent as this share's failure
        with suppress(BaseException):
            writer.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        os._exit(code)


def _ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"
