"""Scheduler.plan: continuous batching of running and waiting sequences."""

import dataclasses

import pytest

from decode_svc.scheduler import Scheduler, SeqView, StepPlan


def seq(handle: str, kv_ready: bool = True, cancelled: bool = False) -> SeqView:
    return SeqView(handle, kv_ready=kv_ready, cancelled=cancelled)


def test_running_sequences_keep_running_in_order():
    plan = Scheduler(max_batch_size=4).plan(waiting=[], running=[seq("a"), seq("b")])
    assert plan == StepPlan(admit=(), run=("a", "b"), drop=())


def test_ready_waiting_sequences_are_admitted_oldest_first_up_to_the_batch_size():
    waiting = [seq("w1"), seq("w2"), seq("w3")]
    plan = Scheduler(max_batch_size=3).plan(waiting=waiting, running=[seq("r1")])
    assert plan.admit == ("w1", "w2")
    assert plan.run == ("r1", "w1", "w2")
    assert plan.drop == ()


def test_waiting_sequence_without_kv_keeps_waiting_and_the_next_ready_one_goes_first():
    waiting = [seq("w1", kv_ready=False), seq("w2")]
    plan = Scheduler(max_batch_size=4).plan(waiting=waiting, running=[])
    assert plan.admit == ("w2",)
    assert plan.run == ("w2",)


def test_full_batch_admits_nobody():
    plan = Scheduler(max_batch_size=2).plan(waiting=[seq("w1")], running=[seq("r1"), seq("r2")])
    assert plan.admit == ()
    assert plan.run == ("r1", "r2")


def test_running_sequences_are_never_preempted_when_over_the_batch_size():
    running = [seq("r1"), seq("r2"), seq("r3")]
    plan = Scheduler(max_batch_size=2).plan(waiting=[seq("w1")], running=running)
    assert plan.run == ("r1", "r2", "r3")
    assert plan.admit == ()


def test_cancelled_sequences_are_dropped_and_not_run():
    waiting = [seq("w1", cancelled=True), seq("w2", kv_ready=False, cancelled=True), seq("w3")]
    running = [seq("r1", cancelled=True), seq("r2")]
    plan = Scheduler(max_batch_size=4).plan(waiting=waiting, running=running)
    assert plan.drop == ("w1", "w2", "r1")
    assert plan.run == ("r2", "w3")
    assert plan.admit == ("w3",)


def test_a_cancelled_running_sequence_frees_its_batch_slot():
    plan = Scheduler(max_batch_size=2).plan(waiting=[seq("w1")], running=[seq("r1", cancelled=True), seq("r2")])
    assert plan.run == ("r2", "w1")
    assert plan.drop == ("r1",)


def test_plan_is_immutable():
    plan = Scheduler(max_batch_size=1).plan(waiting=[], running=[])
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.run = ("x",)
