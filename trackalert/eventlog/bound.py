"""A helper call's filter parsed once per shape and bound to each call's values.

Why it exists: the starter policies ask the same few filters on every report with another
login, address or pwhash each time, so a cache of parsed filters keyed by their values missed
nearly always (20,000 logins), and each call parsed its filter, built a `Filter` of 14 fields and
derived the projections' key tuple from it again. A *plan* is what every filter with the same
keys in the same order shares (keys.py's key specs, which key is `success`/`window`/...): made
once, it checks and converts each call's values with parse_filter's own converters (the same
errors, in the same order) and yields the projections' key tuple directly; the `Filter` that SQL
takes is built only when SQL answers.
"""

from __future__ import annotations

from typing import Any, Callable

from trackalert.eventlog.filters import Filter, FilterError, key_converter, parse_filter
from trackalert.eventlog.ipkey import ip_key
from trackalert.eventlog.keys import EQUALITY_ORDER, network_key

#: Plans kept at most (a policy building filters from data must not grow memory without end).
MAX_PLANS = 1024


class FilterPlan:
    """The parse of every filter whose keys are `keys`, in this order."""

    __slots__ = ("keys", "_converters", "_attributes", "_maps", "_positions", "_key_parts",
                 "_specs", "windowing_at")

    def __init__(self, keys: tuple[str, ...]) -> None:
        parts = [key_converter(key) for key in keys]  # an unknown key raises FilterError
        self.keys = keys
        self._converters = tuple(convert for _, _, convert in parts)
        self._attributes = [(i, attribute) for i, (attribute, name, _) in enumerate(parts) if not name]
        self._positions = {attribute: i for i, attribute in self._attributes}
        maps: dict[str, list[tuple[str, int]]] = {"device_attrs": [], "attrs": []}
        for i, (attribute, name, _) in enumerate(parts):
            if name:
                maps[attribute].append((name, i))
        self._maps = {attribute: sorted(pairs) for attribute, pairs in maps.items()}
        # keys.equality_keys' order: the plain keys, then device_attrs and attrs by key
        parts_of: list[tuple[str, int, Callable[[Any], Any] | None]] = []
        for attribute in EQUALITY_ORDER:
            if attribute in self._positions:
                transform = ip_key if attribute == "remote" else None
                parts_of.append((attribute, self._positions[attribute], transform))
        for prefix, attribute in (("d:", "device_attrs"), ("a:", "attrs")):
            parts_of.extend((prefix + name, i, None) for name, i in self._maps[attribute])
        self._key_parts = parts_of
        #: the key specs, unless a netmask's (its family and bits) depends on its value
        self._specs = None if "netmask" in self._positions else tuple(spec for spec, _, _ in parts_of)
        #: where success, window, since and until are (-1: not a key): read on every bind
        self.windowing_at = tuple(self._positions.get(attribute, -1)
                                for attribute in ("success", "window", "since", "until"))

    def bind(self, values: tuple) -> "BoundFilter":
        """This call's filter; the first value its key refuses raises FilterError, as
        parse_filter would for these pairs."""
        return BoundFilter(self, [convert(value) for convert, value in zip(self._converters, values)])

    def parse(self, values: tuple) -> list:
        """`bind`'s parsed values alone (the same checks, the same first error)."""
        return [convert(value) for convert, value in zip(self._converters, values)]

    def build(self, parsed: list) -> Filter:
        fields = {attribute: parsed[i] for i, attribute in self._attributes}
        for attribute, pairs in self._maps.items():
            if pairs:
                fields[attribute] = tuple((name, parsed[i]) for name, i in pairs)
        return Filter(**fields)

    def get(self, parsed: list, attribute: str) -> Any:
        i = self._positions.get(attribute)
        return None if i is None else parsed[i]

    def equality(self, parsed: list) -> tuple[tuple[str, ...], tuple]:
        """keys.equality_keys of the filter these values make, without making it."""
        specs, values = self._specs, []
        if specs is None:
            spec_list = []
            for spec, i, transform in self._key_parts:
                value = parsed[i]
                if spec == "netmask":
                    spec, value = network_key(value)
                elif transform is not None:
                    value = transform(value)
                spec_list.append(spec)
                values.append(value)
            return tuple(spec_list), tuple(values)
        for _, i, transform in self._key_parts:
            values.append(parsed[i] if transform is None else transform(parsed[i]))
        return specs, tuple(values)


class BoundFilter:
    """One call's filter: its plan and its values, as parsed. Reads like a `Filter` for what
    the projections look at (`success`, `window`, `since`, `until`, `equality`); `filter` is
    the `Filter` itself, made on first use (for SQL)."""

    __slots__ = ("plan", "parsed", "success", "window", "since", "until", "_filter", "_equality")

    def __init__(self, plan: FilterPlan, parsed: list) -> None:
        self.plan, self.parsed = plan, parsed
        success, window, since, until = plan.windowing_at
        self.success = None if success < 0 else parsed[success]
        self.window = None if window < 0 else parsed[window]
        self.since = None if since < 0 else parsed[since]
        self.until = None if until < 0 else parsed[until]
        self._filter: Filter | None = None
        self._equality: tuple[tuple[str, ...], tuple] | None = None

    @property
    def filter(self) -> Filter:
        if self._filter is None:
            self._filter = self.plan.build(self.parsed)
        return self._filter

    @property
    def equality(self) -> tuple[tuple[str, ...], tuple]:
        if self._equality is None:
            self._equality = self.plan.equality(self.parsed)
        return self._equality


_plans: dict[tuple, FilterPlan] = {}


def plan_of(keys: tuple) -> FilterPlan | None:
    """The plan of filters with these keys (made on first use), None when a key is unknown."""
    plan = _plans.get(keys)
    if plan is None:
        try:
            plan = FilterPlan(keys)
        except FilterError:
            return None
        if len(_plans) >= MAX_PLANS:
            _plans.clear()
        _plans[keys] = plan
    return plan


def bind_pairs(flat: tuple) -> BoundFilter | Filter:
    """The filter of flat (key, value, ...) pairs: bound to the plan of its keys (made on first
    use), or, when its keys make no plan (an unknown key), parse_filter's own answer: the
    error it raises for the first bad pair in order."""
    keys = flat[::2]
    plan = _plans.get(keys) or plan_of(keys)
    if plan is None:
        return parse_filter(zip(keys, flat[1::2]))
    return plan.bind(flat[1::2])


def as_filter(flt: "BoundFilter | Filter") -> Filter:
    """The `Filter` a backend's queries take."""
    return flt.filter if type(flt) is BoundFilter else flt
