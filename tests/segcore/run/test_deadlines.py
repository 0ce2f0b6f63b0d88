"""Per-unit timeouts from the measured time, the retry back-off, and the failed-records of a run directory."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from segcore.config import SegmentSpec
from segcore.run.deadlines import UnitTimeouts, retry_delay
from segcore.run.rundir import clear_failed, failed_records, mark_failed


def test_timeouts_follow_the_median_seconds_per_image_within_floor_and_cap() -> None:
    t = UnitTimeouts(floor=10, cap=100, factor=5)
    assert t.timeout(8) == 100  # nothing measured yet: the cap
    for seconds, images in [(4, 4), (6, 2), (2, 4)]:  # 1.0, 3.0, 0.5 s per image: median 1.0
        t.measured(seconds=seconds, images=images)
    assert t.timeout(4) == 20  # 5 x 1.0 x 4
    assert t.timeout(1) == 10  # 5 below the floor
    assert t.timeout(64) == 100  # 320 above the cap
    t.measured(seconds=1, images=0)  # nothing to learn from
    assert t.per_image == [1.0, 3.0, 0.5]
    with pytest.raises(ValueError, match="floor <= cap"):
        UnitTimeouts(floor=5, cap=4)


def test_retries_wait_twice_as_long_each_time() -> None:
    assert [retry_delay(a) for a in (2, 3, 4)] == [2.0, 4.0, 8.0]


def test_the_spec_refuses_a_floor_above_the_cap() -> None:
    with pytest.raises(ValidationError, match="exceeds unit_timeout_cap"):
        SegmentSpec(store="s.zarr", checkpoint="m.safetensors", out="r", unit_timeout_floor=10, unit_timeout_cap=5)


def test_failed_records_by_key_and_cleared(tmp_path) -> None:
    run_dir = str(tmp_path / "run")
    assert failed_records(run_dir, "k1") == {}
    mark_failed(run_dir, key="k1", unit="unit-00003", reason="timed out after 5 s", attempts=3)
    mark_failed(run_dir, key="k2", unit="unit-00004", reason="other run", attempts=1)
    found = failed_records(run_dir, "k1")
    assert list(found) == ["unit-00003"]
    assert (found["unit-00003"]["reason"], found["unit-00003"]["attempts"]) == ("timed out after 5 s", 3)
    clear_failed(run_dir, ["unit-00003", "unit-00009"])
    assert failed_records(run_dir, "k1") == {} and list(failed_records(run_dir, "k2")) == ["unit-00004"]


def test_a_block_weighs_its_share_of_a_whole_block_in_its_timeout():
    from flows.pipeline import unit_weights
    from segcore.run.plan import WorkUnit
    from segcore.tiling import Window

    units = [WorkUnit(0, "g000", 0, 8), WorkUnit(1, "g001", 0, 1, window=Window(0, 1024, 0, 1024)),
             WorkUnit(2, "g001", 0, 1, window=Window(0, 1024, 1024, 1536)),  # a half block at the edge
             WorkUnit(3, "g001", 0, 1, window=Window(1024, 1076, 1024, 1076))]  # a 52 x 52 corner
    assert unit_weights(units) == {"unit-00000": 8.0, "unit-00001": 1.0, "unit-00002": 0.5, "unit-00003": 1 / 16}
    timeouts = UnitTimeouts(floor=1, cap=1000)
    for u, seconds in ((units[1], 40.0), (units[2], 20.0), (units[3], 2.0)):
        timeouts.measured(seconds=seconds, images=unit_weights(units)[u.name])
    assert timeouts.timeout(1.0) == 5 * 40.0  # the median of 40, 40 and 32 s a whole block
