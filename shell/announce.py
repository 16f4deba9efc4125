"""Status while slow work runs: announce it once it passes a mark, then say how long it took."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

NotifyFn = Callable[[str], None]
SLOW_LOAD_S = 0.5  # work that takes longer than this is announced, then timed


@contextmanager
def announced(notify: NotifyFn | None, start: str, done: str) -> Iterator[None]:
    """Run the block; if it is still running after SLOW_LOAD_S, `notify(start)`, and when it ends,
    `notify(f"{done} in N s")`. Without `notify`, just run it."""
    if notify is None:
        yield
        return
    began, lock, shown = time.perf_counter(), threading.Lock(), []

    def announce() -> None:
        with lock:
            if not shown:
                shown.append(True)
                notify(start)

    timer = threading.Timer(SLOW_LOAD_S, announce)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        with lock:
            timer.cancel()
            shown.append(False)  # from here on the timer shows nothing
            if shown[0]:
                notify(f"{done} in {time.perf_counter() - began:.1f} s")
