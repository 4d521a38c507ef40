"""Kill a server's process group when the process that started it dies, even by SIGKILL.

``SimulationServer.start`` runs ``python -m zerosearch.search.watchdog PGID PARENT_PID`` next to the server,
as a child of the trainer in a session of its own (a Ctrl-C in the terminal does not reach it). It polls
its parent: when the trainer is gone (it was re-parented), it sends SIGTERM to the server's group, then
SIGKILL after a grace period; when the server is gone, it exits. An orderly ``stop()`` kills it.

Why not ``prctl(PR_SET_PDEATHSIG)`` in the server: it fires when the *thread* that forked the server
exits (a start from a helper thread would kill a healthy server), and it reaches only the server process,
not the engine processes it spawns; a group kill reaches them all. Linux and macOS alike.
"""

from __future__ import annotations

import os
import signal
import sys
import time

POLL_S = 0.2
GRACE_S = 10.0


def _group_alive(pgid: int) -> bool:
    """Whether any process is left in the group (zombies not yet reaped count too)."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal: it is there
        return True


def watch(pgid: int, parent: int, poll_s: float = POLL_S, grace_s: float = GRACE_S) -> int:
    """Wait while ``parent`` and the group's leader live; on the parent's death, end the group."""
    while os.getppid() == parent:
        try:
            os.kill(pgid, 0)  # the leader (the server) is gone and reaped: nothing left to guard
        except ProcessLookupError:
            return 0
        time.sleep(poll_s)
    # The trainer died without stopping the server: SIGTERM (a clean shutdown frees GPU memory), then SIGKILL.
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return 0
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _group_alive(pgid):
        time.sleep(poll_s)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m zerosearch.search.watchdog PGID PARENT_PID [GRACE_S]", file=sys.stderr)
        return 2
    # PARENT_PID comes from the trainer itself: had it died before this started, getppid() would already differ
    return watch(int(args[0]), int(args[1]), grace_s=float(args[2]) if len(args) > 2 else GRACE_S)


if __name__ == "__main__":
    raise SystemExit(main())
