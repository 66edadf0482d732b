"""Child processes that never outlive the node, even one killed with SIGKILL.

A killed node runs no cleanup, so what it started must hear of its death from
the kernel: ``PR_SET_PDEATHSIG`` (Linux) sends a process a signal when its
parent goes. "Parent" is the *thread* that forked it, though, so each child is
tied in a way that survives the node's threads coming and going:

- vLLM's engine core (a multiprocessing child, by fork or by spawn) is started
  from the engine's own asyncio thread, which lives until the engine is
  stopped. Its first act is ``die_with_parent()`` (see
  ``joynode.inference.engine``): SIGKILL when the node goes.
- Programs the node runs (anvil, the ZoKrates worker; a devnet's nodes) are started by trio from
  worker threads that end when idle, so they run under ``tethered(command)``:
  this module as a small single-threaded process that runs the program with
  SIGKILL as its parent-death signal (its parent thread is then this process
  itself), and takes SIGUSR1 as its own. On SIGUSR1 it checks whether the node
  is gone (it was handed to another parent) or only one of its threads ended;
  if the node is gone it exits and the kernel kills the program. It passes
  SIGTERM and SIGHUP on and exits as the program did, so to its caller it is
  the program.

Elsewhere than Linux these are no-ops: children may outlive a killed node.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType
from typing import NoReturn

PR_SET_PDEATHSIG = 1
CANNOT_RUN = 127  # as a shell says "command not found"


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Have the kernel send ``sig`` to this process when the thread that started it ends.

    ``parent``: the pid expected as parent; if the process already has another
    (the parent went before the signal was armed), ``sig`` is sent at once.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def tethered(command: Sequence[str]) -> list[str]:
    """``command`` run so that it dies with this process (see the module's docstring)."""
    if not sys.platform.startswith("linux"):
        return list(command)
    return [sys.executable, "-m", "joynode.tether", str(os.getpid()), "--", *command]


def _run(node: int, command: list[str]) -> NoReturn:
    me = os.getpid()

    def node_gone(_: int, __: FrameType | None) -> None:
        if os.getppid() != node:
            os._exit(128 + signal.SIGKILL)  # the kernel kills the program with us

    signal.signal(signal.SIGUSR1, node_gone)
    die_with_parent(signal.SIGUSR1, node)
    try:
        # preexec_fn is safe here: this process has one thread.
        program = subprocess.Popen(command, preexec_fn=lambda: die_with_parent(parent=me))
    except OSError as exc:
        print(f"joynode tether: cannot run {command[0]}: {exc}", file=sys.stderr)
        sys.exit(CANNOT_RUN)

    def pass_on(signum: int, _: FrameType | None) -> None:
        program.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, pass_on)
    # Ctrl-C reaches the program from the terminal (one process group); not twice.
    signal.signal(signal.SIGINT, lambda _, __: None)
    code = program.wait()
    if code < 0:  # killed by a signal: die of the same one
        with contextlib.suppress(OSError, ValueError):  # SIGKILL has no handler to reset
            signal.signal(-code, signal.SIG_DFL)
        os.kill(me, -code)
        code = 128 - code
    sys.exit(code)


if __name__ == "__main__":
    node_pid, separator, *program_command = sys.argv[1:]
    if separator != "--" or not program_command:
        sys.exit("usage: python -m joynode.tether NODE_PID -- COMMAND [ARG...]")
    _run(int(node_pid), program_command)
