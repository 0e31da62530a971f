"""The engine thread survives a failing step: in-flight work is ended, later steps still run."""

import threading
import time

from common.runtime.engine_loop import EngineLoop


def test_failed_step_ends_work_in_flight_and_the_loop_keeps_stepping():
    cond = threading.Condition()
    calls, errors = [], []
    done = threading.Event()

    def step() -> bool:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("boom")
        if len(calls) == 3:
            done.set()
        return True

    loop = EngineLoop("test", cond, step=step, has_work=lambda: not done.is_set(),
                      on_error=lambda: errors.append("ended"))
    loop.start()
    try:
        assert done.wait(5)
    finally:
        loop.stop()
    assert errors == ["ended"]
    assert len(calls) == 3


def test_idle_loop_sleeps_and_runs_on_idle():
    cond = threading.Condition()
    idle = threading.Event()
    loop = EngineLoop("test", cond, step=lambda: True, has_work=lambda: False, on_idle=idle.set)
    loop.start()
    try:
        assert idle.wait(5)
    finally:
        loop.stop()
