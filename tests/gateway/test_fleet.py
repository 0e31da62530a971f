"""Fleet and the tier lists' entries: static addresses stay, DNS names are followed (instances found are added,
instances gone are removed, a name that fails to resolve keeps what it had), and Membership and the prefix index
take instances in and out as the Fleet says."""

import pytest

from common.basics.targets import parse_target
from common.edge.discovery import Instance
from gateway.fleet import Fleet
from gateway.kv_index import PrefixIndex
from gateway.membership import Membership


def test_targets_are_parsed_as_grpc_names_them():
    assert parse_target("decode:50053").resolved is False
    named = parse_target("dns:///pdserve-decode:50053")
    assert (named.host, named.port, named.dns_server, named.resolved) == ("pdserve-decode", 50053, None, True)
    asked = parse_target("dns://10.0.0.10:5353/decode.ns.svc:7")
    assert (asked.dns_server, asked.dns_port, asked.host, asked.port) == ("10.0.0.10", 5353, "decode.ns.svc", 7)
    for bad in ("decode", "decode:0", "decode:x", "dns:decode:1", "dns:/decode:1"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_the_fleet_adds_what_a_name_gains_removes_what_it_loses_and_keeps_it_when_the_lookup_fails():
    records = {"dns:///d:9": [Instance("10.0.0.1:9", "d")]}
    fleet = Fleet({"prefill": ("p:1",), "decode": ("dns:///d:9", "static:2")}, 1.0,
                  resolver=lambda t: records.get(t.text) if t.resolved else [Instance(t.text)])
    added, removed = [], []
    fleet.resolve_now()
    assert fleet.addresses("decode") == ("10.0.0.1:9", "static:2") and fleet.addresses("prefill") == ("p:1",)
    fleet.on_add, fleet.on_remove = (lambda tier, i: added.append((tier, i.address))), \
        (lambda tier, a: removed.append((tier, a)))
    records["dns:///d:9"] = [Instance("10.0.0.1:9", "d"), Instance("10.0.0.2:9", "d")]
    fleet.resolve_now()
    assert added == [("decode", "10.0.0.2:9")] and removed == []
    records["dns:///d:9"] = None  # the lookup failed: nothing changes
    fleet.resolve_now()
    assert fleet.addresses("decode") == ("10.0.0.1:9", "10.0.0.2:9", "static:2") and removed == []
    records["dns:///d:9"] = [Instance("10.0.0.2:9", "d")]
    fleet.resolve_now()
    assert removed == [("decode", "10.0.0.1:9")] and fleet.addresses("decode") == ("10.0.0.2:9", "static:2")


def test_membership_takes_a_found_instance_in_once_serving_and_a_gone_one_out_at_once():
    answers = {"p": True, "d1": True, "d2": True}
    changes = []
    membership = Membership(("p",), ("d1",), check=answers.get, on_instance=lambda a, up: changes.append((a, up)))
    membership.start()
    try:
        membership.add("decode", "d2")
        assert membership.up("decode") == ["d1"]  # not before its health check answers
        membership.recheck("d2")
        assert membership.up("decode") == ["d1", "d2"]
        membership.remove("d1")
        assert membership.up("decode") == ["d2"] and ("d1", False) in changes
        membership.recheck("d1")  # a late answer from a removed instance changes nothing
        assert membership.up("decode") == ["d2"]
    finally:
        membership.stop()


def test_the_prefix_index_forgets_a_removed_instance():
    index = PrefixIndex(("d1",), lambda address, version: None)
    index.add("d2")
    assert index.addresses == ("d1", "d2")
    index.remove("d1")
    assert index.addresses == ("d2",) and index.summary("d1") is None
