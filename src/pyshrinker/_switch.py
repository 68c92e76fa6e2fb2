"""The listener's switch interval: the interpreter's own unless the application asks otherwise.

A Python thread woken by an fd runs only when it gets the GIL: within microseconds when the other
threads are idle, but only after the interpreter's switch interval (5 ms by default, often twice
that) when another thread is busy in Python, because a waiting thread asks the running one to drop
the GIL only after waiting that long. Lowering the interval makes the listener react sooner, and
makes every CPU-bound thread of the application hand the GIL over more often: it is a setting of
the whole interpreter, so pyshrinker never changes it by itself. A thread that reports memory
serves the requests its reports cause itself (direct reclaim, no hand-over at all); the listener
serves the rest, at the interpreter's pace.

:func:`set_reaction_switch_interval` is the opt-in: while pyshrinker's listener runs, the switch
interval is at most the given value, and the previous one is restored when the listener stops
or the option is switched off (unless someone else changed it meanwhile: theirs stays).
"""

from __future__ import annotations

import math
import os
import sys
import threading

#: The value suggested for :func:`set_reaction_switch_interval`, in seconds.
REACTION_SWITCH_INTERVAL = 0.001

_lock = threading.Lock()
_wanted: float | None = None  # the application's choice; None leaves the interpreter alone
_running = 0  # listeners running in this process
_saved: float | None = None  # the interval we replaced
_applied: float | None = None  # the interval we set, as the interpreter reports it


def set_reaction_switch_interval(seconds: float | None) -> None:
    """Opt in to faster reactions: while the listener runs, switch threads every ``seconds``.

    Off (None) by default. The switch interval belongs to the whole interpreter: a lower one makes
    CPU-bound threads hand over the GIL more often (about 3 % slower for two of them at 1 ms, see
    ``benchmarks/overhead.py``), in exchange for the listener getting the GIL within about
    ``seconds`` instead of 5-10 ms when such a thread is busy. Applies at once if the listener
    is running; None restores the interval it replaced.

    .. versionadded:: 0.1.0
    """
    global _wanted
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"seconds must be a number or None, got {seconds!r}")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds must be positive and finite, got {seconds!r}")
    with _lock:
        _wanted = None if seconds is None else float(seconds)
        _apply()


def listener_started() -> None:
    """A listener thread started: apply the option, if the application gave one."""
    global _running
    with _lock:
        _running += 1
        _apply()


def listener_stopped() -> None:
    """A listener thread stopped: restore the interval once none runs."""
    global _running
    with _lock:
        _running = max(0, _running - 1)
        _apply()


def _apply() -> None:
    # Called with _lock held.
    global _saved, _applied
    current = sys.getswitchinterval()
    if _applied is not None and current != _applied:
        # Someone else set the interval after us: it is theirs now, and not ours to restore.
        _saved = _applied = None
    if _wanted is None or _running == 0:
        if _applied is not None and _saved is not None:
            sys.setswitchinterval(_saved)
        _saved = _applied = None
        return
    if _applied is not None and _saved is not None:
        # Ours already: follow the option, never above the interval we replaced.
        sys.setswitchinterval(min(_saved, _wanted))
        _applied = sys.getswitchinterval()
    elif current > _wanted:
        if _saved is None:
            _saved = current
        sys.setswitchinterval(_wanted)
        _applied = sys.getswitchinterval()


def _after_fork_in_child() -> None:
    # The parent's listener does not run here; a new one will call listener_started().
    global _lock, _running
    _lock = threading.Lock()
    _running = 0


os.register_at_fork(after_in_child=_after_fork_in_child)
