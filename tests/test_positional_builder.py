"""The hot path's constructors for frozen, slotted dataclasses (eventlog/base.positional_builder)
build what the class's own __init__ builds."""

from __future__ import annotations

import dataclasses

import pytest

from trackalert.eventlog.base import Appended, Event, new_appended, new_event, positional_builder
from trackalert.eventlog.rows import encode_row, report_from_row
from trackalert.report import Enrichment, Report


def test_a_built_report_equals_the_constructed_one_field_by_field() -> None:
    values = (1.5, "192.0.2.1", "alice", "ph", True, False, "imap", True, "dev", "sess", "ft",
              {"a": "1"}, {"m": ("x", "y")}, {"os": "Linux"}, {"type": "wforce_report"},
              Enrichment("NL", "Amsterdam", 52.3, 4.9, 1136, "KPN"))
    built = positional_builder(Report)(*values)
    assert type(built) is Report
    assert built == Report(*values)
    assert dataclasses.astuple(built) == dataclasses.astuple(Report(*values))
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.login = "mallory"  # type: ignore[misc]


def test_event_and_appended_builders() -> None:
    report = Report(login="bob")
    assert new_event(7, 2.5, report, "d-1") == Event(7, 2.5, report, "d-1")
    assert new_appended(9, True) == Appended(9, True)
    assert new_appended(9, True) != Appended(9, False)


def test_report_from_row_rebuilds_the_encoded_report() -> None:
    report = Report(t=3.0, remote="2001:db8::1", login="carol", pwhash="p", success=True,
                    attrs={"k": "v"}, extra={"x": [1, 2]})
    row = encode_row(report, "dlv")
    assert report_from_row(row, report.attrs, report.attrs_mv, report.device_attrs,
                           report.extra) == report


def test_refuses_a_class_it_cannot_build_faithfully() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked:
        value: int

        def __post_init__(self) -> None:
            if self.value < 0:
                raise ValueError("negative")

    @dataclasses.dataclass(frozen=True)
    class NoSlots:
        value: int

    for cls in (Checked, NoSlots):
        with pytest.raises(TypeError):
            positional_builder(cls)
