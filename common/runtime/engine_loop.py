"""EngineLoop: the thread that drives an engine. It calls `step` while there is work and otherwise
sleeps on the engine's condition variable (woken by new work, or every idle_s to run `on_idle`)."""

import logging
import threading
from collections.abc import Callable

import torch

_IDLE_S = 0.5
_STALLED_S = 0.05  # a step that found nothing runnable (e.g. waiting for blocks) retries this soon
_log = logging.getLogger(__name__)


class EngineLoop:
    def __init__(self, name: str, cond: threading.Condition, *, step: Callable[[], bool],
                 has_work: Callable[[], bool], on_idle: Callable[[], None] = lambda: None,
                 on_error: Callable[[], None] = lambda: None) -> None:
        self._name = name
        self._cond = cond
        self._step = step
        self._has_work = has_work
        self._on_idle = on_idle
        self._on_error = on_error
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the loop after the current step. Caller holds the condition's lock or not; both work."""
        self._stopped = True
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopped:
            with self._cond:
                if not self._has_work():
                    self._on_idle()
                    self._cond.wait(timeout=_IDLE_S)
                    continue
            try:
                progressed = self._step()
            except Exception:
                # A failed step must not stop the engine: end what was in flight, keep serving.
                _log.exception("%s: step failed; ending the requests in flight", self._name)
                self._on_error()
                continue
            if not progressed:
                with self._cond:
                    self._cond.wait(timeout=_STALLED_S)
