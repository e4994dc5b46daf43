"""service.metrics.Tally: what it writes to a histogram is what observing each value writes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from service import metrics
from service.metrics import Metrics, Tally

VALUES = [0, 1, 1.0, 3, 4, 4.5, 16, 17, 1024, 1025, 300_000, 7.25, 64, 65]


def text(of: Metrics) -> list[str]:
    """The rendered metrics, less the creation timestamps (which differ between registries)."""
    return [line for line in of.render().decode().splitlines() if "_created" not in line]


def test_a_tally_writes_what_observing_each_value_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "TALLY_FLUSH_S", 60.0)
    direct, tallied = Metrics(), Metrics()
    rows, jobs = tallied.tally(tallied.pass_rows, "m"), tallied.tally(tallied.pass_requests, "m")
    assert tallied.tally(tallied.pass_rows, "m") is rows  # one per labelled child
    for value in VALUES:
        direct.pass_rows.labels("m").observe(value)
        direct.pass_requests.labels("m").observe(value)
        rows.observe(value)
        jobs.observe(value)
    count = {"model": "m"}
    assert tallied.registry.get_sample_value("flowserve_forward_pass_rows_count", count) == 0
    assert text(tallied) == text(direct)  # rendering writes what the tallies hold
    assert tallied.registry.get_sample_value("flowserve_forward_pass_rows_count", count) == len(
        VALUES
    )
    rows.observe(2048)
    direct.pass_rows.labels("m").observe(2048)
    assert text(tallied) == text(direct)  # and again, only what came since


def test_a_tally_writes_by_itself_once_its_interval_has_passed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(metrics, "TALLY_FLUSH_S", 0.0)
    m = Metrics()
    tally = m.tally(m.pass_requests, "m")
    tally.observe(3)
    tally.observe(70)
    sample = m.registry.get_sample_value
    assert sample("flowserve_forward_pass_requests_count", {"model": "m"}) == 2
    assert sample("flowserve_forward_pass_requests_sum", {"model": "m"}) == 73
    assert sample("flowserve_forward_pass_requests_bucket", {"model": "m", "le": "4.0"}) == 1
    assert sample("flowserve_forward_pass_requests_bucket", {"model": "m", "le": "64.0"}) == 1
    assert sample("flowserve_forward_pass_requests_bucket", {"model": "m", "le": "128.0"}) == 2


def test_a_tally_of_a_child_without_bucket_values_observes_each_value() -> None:
    seen: list[float] = []
    tally = Tally(SimpleNamespace(observe=seen.append))
    tally.observe(5)
    tally.flush()
    assert seen == [5]
