"""Ctrl-C and SIGTERM for our nodes: shut down where the executor waits, never at an arbitrary line.

rclpy.init installs a signal handler that shuts the context down (spin() then raises
ExternalShutdownException) and afterwards calls the Python handler that was installed before it. Python's
default SIGINT handler raises KeyboardInterrupt in the main thread wherever it happens to be: inside a
subscription callback, or between a lock's acquire and the `with` block that would release it, after which
the node's own shutdown waits on that lock forever (the suspected cause of a CI run whose launch test hung
on Ctrl-C).

``install_shutdown_signals()``, called before ``rclpy.init``, puts a handler there that only records the
signal, so the first SIGINT or SIGTERM stops the node cleanly at the executor's next wait. A repeated SIGINT
is ignored (a terminal's Ctrl-C reaches a launched node as well as the launcher that forwards it). A SIGTERM
after an earlier signal exits at once: that is a launcher (ours, ros2 launch) escalating because the clean
stop did not finish, or a person who sent `kill` to a node that did not stop.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field


@dataclass
class ShutdownSignals:
    received: list[int] = field(default_factory=list)

    def __call__(self, signum: int, _frame: object) -> None:
        self.received.append(signum)
        if len(self.received) > 1 and signum == signal.SIGTERM:
            print("SIGTERM while shutting down: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)


def install_shutdown_signals() -> ShutdownSignals:
    """Record SIGINT and SIGTERM instead of raising; call it before rclpy.init (see the module docstring)."""
    handler = ShutdownSignals()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handler)
    return handler
