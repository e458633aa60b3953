"""Termination signals as exceptions, so that the commands' cleanup runs.

Python turns SIGINT (Ctrl-C) into `KeyboardInterrupt`, which unwinds the stack: `atomic_output_dir` removes its
temporary `.OUT.tmp-*` folder, a push deletes the repo it created. SIGTERM (what `kill`, systemd, Docker and job
schedulers send) and SIGHUP (the terminal went away) end a Python process on the spot by default, leaving that folder
behind. `termination_raises` makes them raise `Terminated` instead, so every signal unwinds like Ctrl-C.

`held_signals` covers the few renames that swap finished files into place: a signal that arrives meanwhile waits until
the swap is complete (or rolled back), so it never lands between two renames.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

_hold_depth = 0  # nesting of held_signals blocks (all threads)
_pending: list[int] = []  # signals received while held
# Re-entrant: the handler runs in the main thread between two bytecodes, possibly inside a held_signals block there.
_lock = threading.RLock()


class Terminated(BaseException):
    """The process received SIGTERM or SIGHUP. A BaseException, like KeyboardInterrupt, so that library code that
    catches `Exception` (retries, fallbacks) does not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(signum)


def _handler(signum: int, frame: Any) -> None:
    with _lock:
        if _hold_depth > 0:
            _pending.append(signum)
            return
    _raise_for(signum)


@contextmanager
def termination_raises() -> Iterator[None]:
    """Within the block, SIGINT raises KeyboardInterrupt and SIGTERM / SIGHUP raise `Terminated`; the previous handlers
    come back afterwards. Signals the parent process ignores (`nohup`, background jobs) stay ignored. Outside the main
    thread (where Python cannot set handlers) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in TERMINATING_SIGNALS:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, _handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def held_signals(*, start: bool = True) -> Iterator[Callable[[], None]]:
    """Hold termination signals (those routed through `termination_raises`) until the block ends, then raise for the
    first one that arrived. With `start=False` the hold begins only when the yielded function is called, e.g. at the
    end of an inner `with` block whose exit does the swap."""
    started = False

    def begin() -> None:
        global _hold_depth
        nonlocal started
        with _lock:
            if not started:
                started = True
                _hold_depth += 1

    if start:
        begin()
    try:
        yield begin
    finally:
        if started:
            _release_hold()


def _release_hold() -> None:
    global _hold_depth
    with _lock:
        _hold_depth -= 1
        signum = _pending[0] if _hold_depth == 0 and _pending else None
        if signum is not None:
            _pending.clear()
    if signum is not None:
        _raise_for(signum)
