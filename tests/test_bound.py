"""A filter bound to the plan of its keys is exactly parse_filter's, and so are its errors."""

from __future__ import annotations

import random

import pytest

from trackalert.eventlog.bound import BoundFilter, FilterPlan, as_filter, bind_pairs
from trackalert.eventlog.filters import FilterError, parse_filter
from trackalert.eventlog.keys import equality_keys

#: Values each key may take in a random filter: good ones and ones its key refuses.
VALUES = {
    "login": ["alice", "bob", 42, 1.5, True, None],
    "remote": ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.9", "not an address", 7],
    "netmask": ["192.0.2.0/24", "2001:db8::/32", "10.0.0.0/8", "300.1.2.0/24", False],
    "success": [True, False, 1, "yes"],
    "protocol": ["http", "imap"],
    "pwhash": ["ab12", 99],
    "country": ["DE", "FR", ""],
    "asn": [64500, 64500.0, -1, 1.5, "AS1"],
    "window": ["1h", "30d", 3600, 0, "forever", float("inf")],
    "since": [1700000000, 1.5, "yesterday"],
    "until": [1800000000.5, None],
    "device_attrs.browser.family": ["Chrome", 3, True],
    "device_attrs.app.name": ["Mail"],
    "attrs.site": ["www", 5],
    "logn": ["typo"],
    'attrs.bad"quote': ["x"],
}


def _outcome(fn):
    try:
        return "ok", fn()
    except FilterError as exc:
        return "error", str(exc)


def test_random_filters_bind_as_parse_filter_parses_them() -> None:
    rng = random.Random(9)
    keys = list(VALUES)
    bound_seen = 0
    for _ in range(4000):
        chosen = rng.sample(keys, rng.randint(0, 6))
        flat = tuple(item for key in chosen for item in (key, rng.choice(VALUES[key])))
        pairs = list(zip(flat[::2], flat[1::2]))
        expected = _outcome(lambda: parse_filter(pairs))
        got = _outcome(lambda: bind_pairs(flat))
        assert got[0] == expected[0], (pairs, got, expected)
        if got[0] == "error":
            assert got[1] == expected[1], pairs
            continue
        flt, bound = expected[1], got[1]
        assert as_filter(bound) == flt, pairs
        if type(bound) is BoundFilter:
            bound_seen += 1
            for name in ("success", "window", "since", "until"):
                assert getattr(bound, name) == getattr(flt, name), (name, pairs)
            assert _outcome(lambda: bound.equality) == _outcome(lambda: equality_keys(flt)), pairs
    assert bound_seen > 1000


def test_a_plan_is_shared_by_every_call_with_its_keys_and_errors_are_raised_each_time() -> None:
    first = bind_pairs(("login", "alice", "success", True, "window", "1h"))
    second = bind_pairs(("login", "bob", "success", False, "window", "2h"))
    assert type(first) is BoundFilter and first.plan is second.plan
    assert (first.filter.login, second.filter.login, second.success, second.window) == \
        ("alice", "bob", False, 7200.0)
    for _ in range(2):
        with pytest.raises(FilterError, match="filter key 'success' must be a boolean"):
            bind_pairs(("login", "alice", "success", 1, "window", "1h"))
        with pytest.raises(FilterError, match="unknown filter key 'logn'"):
            bind_pairs(("logn", "alice"))
    with pytest.raises(FilterError, match="unknown filter key"):
        FilterPlan(("login", "colour"))


def test_the_key_tuple_of_a_netmask_follows_its_family() -> None:
    v4 = bind_pairs(("netmask", "192.0.2.0/24", "success", False))
    v6 = bind_pairs(("netmask", "2001:db8::/32", "success", False))
    assert v4.plan is v6.plan
    assert v4.equality == equality_keys(v4.filter) and v4.equality[0] == ("net4/24",)
    assert v6.equality == equality_keys(v6.filter) and v6.equality[0] == ("net6/32",)
