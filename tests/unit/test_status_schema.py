"""The status schema: every metric reads a numeric field its daemon's snapshot type declares (that the daemons
build snapshots with exactly those fields is checked by mypy: they build them as the schema's TypedDicts)."""

from __future__ import annotations

import types
import typing
from typing import Any

import pytest

from bdr import status
from bdr.status import schema


def field_type(snapshot_type: Any, path: tuple[str, ...]) -> Any:
    t = snapshot_type
    for key in path:
        if isinstance(t, types.UnionType):  # a part of the snapshot absent when off (X | None)
            (t,) = [a for a in typing.get_args(t) if a is not type(None)]
        hints = typing.get_type_hints(t)
        assert key in hints, f"{path}: {t.__name__} has no field {key!r}"
        t = hints[key]
    return t


def numeric(t: Any) -> bool:
    """int, float or bool, alone or or-ed with None (a gauge absent while unknown)."""
    if isinstance(t, types.UnionType):
        return all(numeric(a) for a in typing.get_args(t) if a is not type(None))
    return t in (int, float, bool)


@pytest.mark.parametrize(
    ("snapshot_type", "specs"),
    [(schema.ClientSnapshot, schema.CLIENT_METRICS), (schema.ServerSnapshot, schema.SERVER_METRICS)],
)
def test_every_metric_reads_a_numeric_field_of_its_snapshot(
    snapshot_type: Any, specs: list[status.Spec]
) -> None:
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    for spec in specs:
        assert spec.kind in ("counter", "gauge")
        assert numeric(field_type(snapshot_type, spec.path)), f"{spec.name}: {spec.path} is not a number"
        assert spec.kind != "counter" or spec.name.endswith("_total")


def test_field_type_and_numeric_refuse_what_a_metric_cannot_read() -> None:
    with pytest.raises(AssertionError, match="has no field 'nope'"):
        field_type(schema.ServerSnapshot, ("applied", "nope"))
    assert not numeric(field_type(schema.ServerSnapshot, ("replica",)))
    assert numeric(field_type(schema.ServerSnapshot, ("durable_seq",)))
