"""Bounds on rendering a chat template. Templates come from model files: Hugging Face runs them in Jinja's sandbox,
which stops them reaching Python's internals but not from running forever (nested `range(100000)` loops) or building
gigabytes (`'x' * 10**9`). Rendering stays Hugging Face's (`apply_chat_template`, so the text is exactly what the
model expects); this module adds a deadline (a watchdog thread interrupts a rendering that passes it) and a cap on
the size of the result."""

from __future__ import annotations

import ctypes
import threading
import time
from contextlib import contextmanager

MAX_RENDER_SECONDS = 5.0  # a real template renders in milliseconds
MIN_OUTPUT_CAP = 16 << 20  # characters; a rendering may also be a few times its input (long records)
OUTPUT_PER_INPUT = 4


class TemplateLimit(Exception):
    """A template went past a bound: its message says which."""


class TemplateTimeout(TemplateLimit):
    """Raised inside the rendering thread by the watchdog (as a class: an asynchronous exception has no arguments)."""

    def __str__(self) -> str:
        return f"the chat template ran longer than {MAX_RENDER_SECONDS:g} s (a loop without end?)"


class _Watchdog:
    """One daemon thread that raises TemplateTimeout in a thread whose rendering passed its deadline, through
    CPython's public C API PyThreadState_SetAsyncExc (delivered between bytecodes: a compiled template is Python code;
    a single huge C operation such as `'x' * 10**9` is not interrupted, check_output catches its result).
    Costs a dictionary entry per rendering, unlike a trace function (3x slower rendering, measured)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._deadlines: dict[int, float] = {}
        self._fired: set[int] = set()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _raise_in(thread_id: int, exception) -> None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                                   ctypes.py_object(exception) if exception else None)

    def _run(self) -> None:
        while True:
            time.sleep(0.05)
            with self._lock:
                now = time.monotonic()
                for thread_id, deadline in list(self._deadlines.items()):
                    if now > deadline:
                        del self._deadlines[thread_id]
                        self._fired.add(thread_id)
                        self._raise_in(thread_id, TemplateTimeout)

    @contextmanager
    def limit(self, seconds: float):
        thread_id = threading.get_ident()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="mlxtune-template-watchdog")
                self._thread.start()
            self._deadlines[thread_id] = time.monotonic() + seconds
        try:
            yield
        finally:
            with self._lock:
                self._deadlines.pop(thread_id, None)
                if thread_id in self._fired:  # fired as the rendering ended: take back an undelivered exception
                    self._fired.discard(thread_id)
                    self._raise_in(thread_id, None)


_watchdog = _Watchdog()


def time_limit(seconds: float = MAX_RENDER_SECONDS):
    """Abort the rendering in this thread (TemplateTimeout) when it runs past `seconds`."""
    return _watchdog.limit(seconds)


def check_output(rendered: str, input_chars: int) -> str:
    cap = max(MIN_OUTPUT_CAP, OUTPUT_PER_INPUT * input_chars)
    if len(rendered) > cap:
        raise TemplateLimit(f"the chat template wrote {len(rendered):,} characters for {input_chars:,} of "
                            f"messages (over the {cap:,} limit)")
    return rendered
