"""Membership's rotation rules, with the health check scripted: a refusal or NOT_SERVING takes an instance out at
once, a slow answer only after MISSES_OUT in a row, SERVING brings it back; the gateway's own health follows."""

from gateway.membership import MISSES_OUT, Membership


def test_rotation_follows_the_answers_with_patience_only_for_silence():
    answers = {"p": True, "d1": True, "d2": True}
    changes, moves = [], []
    membership = Membership(("p",), ("d1", "d2"), check=answers.get, on_change=changes.append,
                            slots={"d1": 4, "d2": 8}.get, on_instance=lambda address, up: moves.append((address, up)))
    membership.refresh(("p", "d1", "d2"))
    assert membership.up("decode") == ["d1", "d2"] and membership.decode_slots() == 12

    answers["d1"] = None  # no answer in time: a loaded machine, or a frozen instance
    for _ in range(MISSES_OUT - 1):
        membership.refresh(("d1",))
    assert membership.up("decode") == ["d1", "d2"]
    membership.refresh(("d1",))
    assert membership.up("decode") == ["d2"] and membership.decode_slots() == 8

    answers["d2"] = False  # NOT_SERVING (draining) or unreachable (dead): out at once
    membership.refresh(("d2",))
    assert membership.up("decode") == [] and not membership.can_serve() and changes[-1] is False

    answers["d1"] = True
    assert not membership.recheck("d2") and membership.recheck("d1")
    assert membership.up("decode") == ["d1"] and membership.can_serve() and changes[-1] is True
    assert moves == [("p", True), ("d1", True), ("d2", True), ("d1", False), ("d2", False), ("d1", True)]


def test_a_retry_avoids_an_instance_that_did_not_answer_even_while_it_stays_in_rotation():
    answers = {"p": True, "d": True}
    membership = Membership(("p",), ("d",), check=answers.get)
    membership.refresh(("p", "d"))
    answers["d"] = None
    assert membership.recheck("d") is False  # the retry goes elsewhere
    assert membership.up("decode") == ["d"]  # but one slow answer does not take it out
