"""Work in forked child processes: results in order, messages while running, and every way a child can end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mvdata_assets.datasets import forked
from mvdata_assets.datasets.forked import WorkerLost, run_forked
from mvdata_assets.demo import proc_table, wait_for_exit

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not forked.available(), reason="forked workers run on Linux only")


def test_each_share_runs_in_its_own_child_and_messages_arrive_while_they_run() -> None:
    received: list[tuple[int, int, float]] = []

    def work(share: list[int], send: forked.Send) -> tuple[int, list[int]]:
        for item in share:
            send((os.getpid(), item, time.monotonic()))
            time.sleep(0.05)
        return os.getpid(), [item * 10 for item in share]

    def on_message(message: tuple[int, int, float]) -> None:
        received.append((*message[:2], time.monotonic()))

    shares = [[1, 2, 3], [4, 5], [6]]
    started = time.monotonic()
    outcomes = run_forked(shares, work, on_message)

    assert [result for _, result in outcomes] == [[10, 20, 30], [40, 50], [60]]  # type: ignore[misc]
    pids = [pid for pid, _ in outcomes]  # type: ignore[misc]
    assert len(set(pids)) == 3 and os.getpid() not in pids
    assert sorted(item for _, item, _ in received) == [1, 2, 3, 4, 5, 6]
    assert {pid for pid, _, _ in received} == set(pids)
    # the first messages came while the children were still working (~0.15 s for the longest share), not at the end
    assert min(at for _, _, at in received) - started < 0.1
    wait_for_exit(pids, 0)


def test_a_child_that_raises_or_is_killed_loses_only_its_own_share() -> None:
    def work(share: str, send: forked.Send) -> str:
        if share == "raise":
            raise OSError(28, "No space left on device")
        if share == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if share == "exit":
            os._exit(3)
        return share.upper()

    outcomes = run_forked(["a", "raise", "kill", "exit", "b"], work, lambda message: None)

    assert outcomes[0] == "A" and outcomes[4] == "B"
    raised, killed, exited = outcomes[1:4]
    assert isinstance(raised, WorkerLost) and "failed: OSError: [Errno 28] No space left on device" in str(raised)
    assert isinstance(killed, WorkerLost) and str(killed).endswith("ended without a result (killed by SIGKILL)")
    assert isinstance(exited, WorkerLost) and "exit status 3" in str(exited)


def test_children_are_killed_when_the_parent_stops_waiting_for_them() -> None:
    pids: list[int] = []

    def work(share: int, send: forked.Send) -> None:
        send(os.getpid())
        time.sleep(60)

    def on_message(pid: int) -> None:
        pids.append(pid)
        if len(pids) == 2:
            raise KeyboardInterrupt  # as Ctrl+C or a Dagster run's termination would

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_forked([1, 2], work, on_message)
    assert time.monotonic() - started < 10
    assert len(pids) == 2
    wait_for_exit(pids, 0)  # killed and reaped before the exception went on


PARENT = """
import os, sys, time
from mvdata_assets.datasets.forked import run_forked

def work(share, send):
    send(os.getpid())
    time.sleep(60)

run_forked([1, 2], work, lambda pid: print(pid, flush=True))
"""


def test_children_die_with_a_parent_killed_by_sigkill() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pids = [int(parent.stdout.readline()) for _ in range(2)]
        table = proc_table()
        assert all(table.get(pid, (0, 0, "X"))[2] not in ("Z", "X") for pid in pids)  # running
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.communicate(timeout=10)
    wait_for_exit(pids, 10)


def test_ctrl_c_to_the_process_group_is_left_to_the_parent() -> None:
    """The terminal sends SIGINT to every process of the group: a child ignores it, the parent's handling decides."""

    def work(share: int, send: forked.Send) -> int:
        send(os.getpid())
        time.sleep(0.3)
        return share

    outcomes = run_forked([1, 2], work, lambda pid: os.kill(pid, signal.SIGINT))
    assert outcomes == [1, 2]


def test_a_fork_that_fails_kills_the_children_already_started(monkeypatch: pytest.MonkeyPatch) -> None:
    real_fork = os.fork
    started: list[int] = []

    def fork() -> int:
        if started:
            raise OSError(11, "Resource temporarily unavailable")
        pid = real_fork()
        if pid:
            started.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)

    def work(share: int, send: forked.Send) -> None:
        time.sleep(60)

    begun = time.monotonic()
    with pytest.raises(OSError, match="Resource temporarily unavailable"):
        run_forked([1, 2], work, lambda message: None)
    assert time.monotonic() - begun < 10
    assert len(started) == 1
    wait_for_exit(started, 0)
