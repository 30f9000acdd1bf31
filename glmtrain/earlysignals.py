"""Preemption signals that arrive before the config is read (e.g. SLURM's USR1 in a job's first seconds).

The default action of SIGUSR1/SIGUSR2/SIGTERM is to kill the process, and importing torch and
Lightning takes seconds: :func:`install` (the first thing ``python -m glmtrain`` does, no imports)
only records them.  Once the config is known, :func:`hand_over` passes the recorded signals to
:data:`glmtrain.cluster.FLAG`, which acts on them at the first optimizer-step boundary like on any
later one (checkpoint, stop, requeue).  A signal the config does not handle (no entry in
``trainer.signals``) gets its default action back and, if it arrived early, is re-raised: the
process then ends exactly as it would have without glmtrain's handler.
"""

from __future__ import annotations

import os
import signal

EARLY = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
_received: list[signal.Signals] = []
_installed = False


def _record(signum, frame) -> None:
    _received.append(signal.Signals(signum))


def install() -> None:
    global _installed
    if _installed:
        return
    for sig in EARLY:
        if signal.getsignal(sig) == signal.SIG_DFL:  # a parent's SIG_IGN or handler stays
            signal.signal(sig, _record)
    _installed = True


def hand_over(flag, actions: dict[str, str]) -> None:
    """Install ``actions`` on ``flag`` and give it the signals received so far (see the module doc)."""
    global _installed
    flag.install(actions)
    handled = set(flag.actions) | {s for s in EARLY if signal.getsignal(s) == signal.SIG_IGN}
    flag.received.extend(s for s in _received if s in flag.actions)
    for sig in EARLY:
        if sig not in handled and signal.getsignal(sig) is _record:
            signal.signal(sig, signal.SIG_DFL)
    pending = [s for s in _received if s not in handled]
    _received.clear()
    _installed = False
    for sig in pending:
        os.kill(os.getpid(), sig)
