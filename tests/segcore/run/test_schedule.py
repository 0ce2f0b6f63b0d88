"""What a tiled run still has to do, from its plan and done-records (:class:`TiledSchedule`)."""

from __future__ import annotations

from segcore.run.context import DetectRecord, ImageRecord, Tiling
from segcore.run.plan import RunPlan, WorkUnit
from segcore.run.schedule import TiledSchedule
from segcore.tiling import Window


def _plan() -> RunPlan:
    """Two tiled images (g001 images 0 and 1) of two blocks each, after a unit of small images."""
    units = [WorkUnit(0, "g000", 0, 4)]
    for index in (0, 1):
        for x0 in (0, 64):
            units.append(WorkUnit(len(units), "g001", index, index + 1, Window(0, 64, x0, x0 + 64)))
    return RunPlan(units=tuple(units), tiling=Tiling(tile=64, overlap=8))


def _detected(units, objects: int = 2) -> dict:
    return {f"{u.name}.detect": DetectRecord(unit=u.name, key="k", objects=objects, windows=1, capped=0, seconds=0.1)
            for u in units}


def test_an_image_left_out_runs_no_step_of_either_pass_and_is_left_out_once():
    plan = _plan()
    kept, gone = plan.blocks_of("g001", 1), plan.blocks_of("g001", 0)
    schedule = TiledSchedule(plan, {}, instance=True, shapes={"g001": (64, 128)}, left_out={("g001", 0)})
    assert schedule.to_detect() == kept and schedule.stats_needed() == [("g001", 1)]
    detections = _detected(kept)  # the blocks left out have no detection record: not needed for the ids
    assert schedule.first_ids(detections) == {kept[0].name: 1, kept[1].name: 3}
    pasted = schedule.to_paste(detections, redetected=kept)
    assert [u for u, _ in pasted] == kept and {s for _, sources in pasted for s, _ in sources} == {u.name for u in kept}
    records = {u.name: f"record of {u.name}" for u in kept}  # only handed on
    (job,) = schedule.to_finish(kept, records, detections)
    assert (job.group, job.index, job.records) == ("g001", 1, tuple(records.values()))
    assert schedule.to_leave_out() == [("g001", 0)]
    done = {"image-g001-000000": ImageRecord(part="g001-000000", group="g001", index=0, key="k", image_id="a",
                                             blocks=len(gone), dice_rows=0, superseded=True)}
    assert TiledSchedule(plan, done, instance=False, shapes={"g001": (64, 128)},
                         left_out={("g001", 0)}).to_leave_out() == []
    semantic = TiledSchedule(plan, {}, instance=False, shapes={"g001": (64, 128)}, left_out={("g001", 0)})
    assert semantic.to_segment() == kept
