"""Pure unit tests of proxy.outlier (and proxy.limits): ejection, growth, caps, probing back."""

from __future__ import annotations

import pytest

from meshctl.proxy.balance import Endpoint
from meshctl.proxy.limits import CircuitLimits, LimitsConfigError
from meshctl.proxy.outlier import OutlierConfigError, OutlierDetector

T0 = 1000.0


def pool(count: int) -> list[Endpoint]:
    return [Endpoint("cart@v1#%d" % i, "v1", ("127.0.0.1", 43000 + i)) for i in range(count)]


def fail(detector: OutlierDetector, endpoint: Endpoint, times: int, now: float, total: int) -> list[bool]:
    return [detector.record(endpoint, False, now, total) for _ in range(times)]


def test_defaults():
    detector = OutlierDetector(None)
    assert (detector.consecutive_errors, detector.interval, detector.base_ejection_time) == (5, 10.0, 30.0)
    assert (detector.max_ejection_percent, detector.max_ejection_time, detector.enabled) == (10.0, 300.0, True)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ([], "outlier_detection: expected a mapping"),
        ({"consecutive_errors": 0}, "outlier_detection.consecutive_errors: expected an integer >= 1"),
        ({"consecutive_errors": 2.5}, "outlier_detection.consecutive_errors: expected an integer >= 1"),
        ({"interval": -1}, "outlier_detection.interval: expected a number >= 0"),
        ({"base_ejection_time": "30s"}, "outlier_detection.base_ejection_time: expected a number"),
        ({"max_ejection_percent": 150}, "outlier_detection.max_ejection_percent: expected 0 to 100"),
        ({"enabled": "no"}, "outlier_detection.enabled: expected true or false"),
        ({"consecutive_5xx": 3}, "outlier_detection.consecutive_5xx: unknown key"),
    ],
)
def test_bad_config(cfg, message):
    with pytest.raises(OutlierConfigError) as caught:
        OutlierDetector(cfg)
    assert str(caught.value).startswith(message)


def test_ejects_after_consecutive_errors():
    endpoints = pool(3)
    detector = OutlierDetector({"consecutive_errors": 3})
    assert fail(detector, endpoints[0], 3, T0, 3) == [False, False, True]
    assert endpoints[0].ejected_until == T0 + 30.0
    assert not endpoints[0].available(T0 + 29.9) and endpoints[0].available(T0 + 30.0)
    assert detector.ejected_ids(T0) == ["cart@v1#0"]
    assert detector.ejected_ids(T0 + 30.0) == []


def test_a_success_resets_the_count():
    endpoint = pool(2)[0]
    detector = OutlierDetector({"consecutive_errors": 3})
    fail(detector, endpoint, 2, T0, 2)
    detector.record(endpoint, True, T0, 2)
    assert fail(detector, endpoint, 2, T0, 2) == [False, False]
    assert endpoint.ejected_until == 0.0


def test_results_during_ejection_are_ignored():
    endpoint = pool(2)[0]
    detector = OutlierDetector({"consecutive_errors": 1})
    assert detector.record(endpoint, False, T0, 2)
    assert fail(detector, endpoint, 5, T0 + 1, 2) == [False] * 5
    detector.record(endpoint, True, T0 + 2, 2)
    assert endpoint.ejected_until == T0 + 30.0


def test_probe_success_brings_it_back_probe_failure_ejects_again_for_longer():
    endpoints = pool(4)
    detector = OutlierDetector({"consecutive_errors": 2, "interval": 10.0, "base_ejection_time": 30.0})
    first = endpoints[0]
    fail(detector, first, 2, T0, 4)
    assert first.ejected_until == T0 + 30.0
    # Back after 30 s, on probation: one failure ejects again, for 2 x 30 s.
    assert detector.record(first, False, T0 + 30.0, 4)
    assert first.ejected_until == T0 + 30.0 + 60.0
    assert detector.ejection_count(first.id, T0 + 90.0) == 2

    second = endpoints[1]
    fail(detector, second, 2, T0 + 200, 4)
    detector.record(second, True, T0 + 230.0, 4)  # the probe succeeded
    assert fail(detector, second, 1, T0 + 231.0, 4) == [False]  # back to counting from zero
    assert fail(detector, second, 1, T0 + 231.0, 4) == [True]


def test_ejection_time_grows_and_is_capped():
    endpoint = pool(2)[0]
    detector = OutlierDetector({"consecutive_errors": 1, "base_ejection_time": 100.0, "max_ejection_time": 250.0})
    now = T0
    durations = []
    for _ in range(4):
        assert detector.record(endpoint, False, now, 2)
        durations.append(endpoint.ejected_until - now)
        now = endpoint.ejected_until
    assert durations == [100.0, 200.0, 250.0, 250.0]


def test_ejection_count_decays_when_stable():
    endpoint = pool(2)[0]
    detector = OutlierDetector({"consecutive_errors": 1, "interval": 10.0, "base_ejection_time": 30.0})
    detector.record(endpoint, False, T0, 2)
    detector.record(endpoint, False, T0 + 30.0, 2)  # probe failed: ejected until T0 + 90
    assert detector.ejection_count(endpoint.id, T0 + 90.0) == 2
    detector.record(endpoint, True, T0 + 90.0, 2)
    assert detector.ejection_count(endpoint.id, T0 + 99.0) == 2
    assert detector.ejection_count(endpoint.id, T0 + 100.0) == 1
    assert detector.ejection_count(endpoint.id, T0 + 150.0) == 0
    assert detector.record(endpoint, False, T0 + 150.0, 2)
    assert endpoint.ejected_until == T0 + 180.0  # back to the base time


@pytest.mark.parametrize(
    ("total", "percent", "ejectable"),
    [(1, 10, 0), (2, 10, 1), (10, 10, 1), (20, 10, 2), (4, 50, 2), (4, 100, 4), (3, 0, 1)],
)
def test_max_ejection_percent_with_a_floor_of_one(total, percent, ejectable):
    endpoints = pool(total)
    detector = OutlierDetector({"consecutive_errors": 1, "max_ejection_percent": percent})
    for endpoint in endpoints:
        detector.record(endpoint, False, T0, total)
    assert len(detector.ejected_ids(T0)) == ejectable
    assert sum(not endpoint.available(T0) for endpoint in endpoints) == ejectable


def test_ejection_slot_frees_when_an_ejection_ends():
    endpoints = pool(2)
    detector = OutlierDetector({"consecutive_errors": 1})
    assert detector.record(endpoints[0], False, T0, 2)
    assert not detector.record(endpoints[1], False, T0 + 1, 2)
    assert detector.record(endpoints[1], False, T0 + 30.0, 2)
    assert detector.ejected_ids(T0 + 30.0) == ["cart@v1#1"]


def test_disabled_never_ejects():
    endpoint = pool(2)[0]
    detector = OutlierDetector({"enabled": False, "consecutive_errors": 1})
    assert fail(detector, endpoint, 10, T0, 2) == [False] * 10
    assert endpoint.ejected_until == 0.0


def test_apply_carries_ejections_to_a_new_snapshot_and_forgets_the_gone():
    old = pool(3)
    detector = OutlierDetector({"consecutive_errors": 1})
    detector.record(old[0], False, T0, 3)
    assert detector.ejected_ids(T0) == ["cart@v1#0"]
    new = pool(3)
    detector.apply(new)
    assert new[0].ejected_until == T0 + 30.0 and new[1].ejected_until == 0.0
    detector.apply(new[1:])
    assert detector.ejected_ids(T0) == []
    assert "tracking 0 endpoints" in repr(detector)


def test_limits_acquire_and_release():
    limits = CircuitLimits.from_config({"max_connections": 2, "max_pending": 1})
    assert [limits.connections.try_acquire() for _ in range(3)] == [True, True, False]
    limits.connections.release()
    assert limits.connections.try_acquire()
    assert limits.pending.try_acquire() and not limits.pending.try_acquire()
    limits.pending.release()
    assert "connections 2/2" in repr(limits)


def test_limits_defaults_and_misuse():
    limits = CircuitLimits.from_config(None)
    assert (limits.connections.maximum, limits.pending.maximum) == (1024, 1024)
    with pytest.raises(RuntimeError, match="max_pending: release"):
        limits.pending.release()
    with pytest.raises(LimitsConfigError, match="limits.max_pending: expected an integer >= 1"):
        CircuitLimits.from_config({"max_pending": 0})


def test_hold_takes_a_slot_now_or_never_and_never_jumps_the_queue():
    limits = CircuitLimits.from_config({"max_connections": 1, "max_pending": 2})
    stream, exchange, later = object(), object(), object()
    assert limits.hold(stream) and not limits.hold(later)
    assert limits.admit(exchange) == "queued"
    assert limits.leave(stream) is exchange  # the freed slot goes to the queued exchange
    assert not limits.hold(later)
    assert limits.leave(exchange) is None and limits.hold(later)
