"""Tests for segcore.run.plan: one unit per chunk, exact coverage (Hypothesis), and check_alignment
refusing straddling, overlapping, missing and unknown-group units."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from segcore.errors import PlanError
from segcore.run.plan import WorkUnit, check_alignment, plan_units
from segcore.collection.store import GroupInfo, StoreInfo


def _group(name: str, count: int, chunk: int, h: int = 4, w: int = 6) -> GroupInfo:
    return GroupInfo(name=name, height=h, width=w, channels=1, dtype="uint8", count=count, chunk_images=chunk)


def _store(*groups: GroupInfo) -> StoreInfo:
    return StoreInfo(path="unused.zarr", groups=tuple(groups), mask_kind="class", has_gt=False, spec={})


def _layout(store: StoreInfo) -> tuple[dict[str, tuple], dict[str, tuple]]:
    return ({g.name: g.chunk_shape for g in store.groups},
            {g.name: (g.count, g.height, g.width) for g in store.groups})


STORE = _store(_group("g000", 5, 2), _group("g001", 3, 3, h=8, w=8))
CHUNKS, COUNTS = _layout(STORE)


def test_one_unit_per_chunk_by_hand() -> None:
    units = plan_units(STORE)
    assert units == [
        WorkUnit(unit_id=0, group="g000", start=0, stop=2),
        WorkUnit(unit_id=1, group="g000", start=2, stop=4),
        WorkUnit(unit_id=2, group="g000", start=4, stop=5),
        WorkUnit(unit_id=3, group="g001", start=0, stop=3),
    ]
    check_alignment(units, chunks=CHUNKS, counts=COUNTS)


def test_unit_names_and_labels() -> None:
    u = WorkUnit(unit_id=42, group="g003", start=8, stop=12)
    assert u.name == "unit-00042"
    assert u.label == "unit-00042 [g003 images 8-11]"
    assert u.n_images == 4
    assert pickle.loads(pickle.dumps(u)) == u  # shippable to workers


def test_empty_store_has_no_units() -> None:
    assert plan_units(_store()) == []
    check_alignment([], chunks={}, counts={})


def test_single_image_chunks() -> None:
    units = plan_units(_store(_group("g000", 3, 1)))
    assert [(u.start, u.stop) for u in units] == [(0, 1), (1, 2), (2, 3)]


@settings(max_examples=100, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=6))
def test_every_image_in_exactly_one_unit(spec: list[tuple[int, int]]) -> None:
    store = _store(*(_group(f"g{i:03d}", count, chunk) for i, (count, chunk) in enumerate(spec)))
    units = plan_units(store)
    assert [u.unit_id for u in units] == list(range(len(units)))
    assert len(units) == sum(g.n_chunks for g in store.groups)
    for g in store.groups:
        hits = [0] * g.count
        for u in units:
            if u.group == g.name:
                assert 0 < u.n_images <= g.chunk_images
                assert u.start % g.chunk_images == 0
                for i in range(u.start, u.stop):
                    hits[i] += 1
        assert hits == [1] * g.count
    chunks, counts = _layout(store)
    check_alignment(units, chunks=chunks, counts=counts)


def test_straddling_unit_is_refused() -> None:
    units = plan_units(STORE)
    units[0] = WorkUnit(unit_id=0, group="g000", start=1, stop=3)
    with pytest.raises(PlanError, match="not aligned"):
        check_alignment(units, chunks=CHUNKS, counts=COUNTS)


def test_unit_longer_than_a_chunk_is_refused() -> None:
    units = [WorkUnit(unit_id=0, group="g000", start=0, stop=4), WorkUnit(unit_id=1, group="g000", start=4, stop=5),
             *plan_units(STORE)[3:]]
    with pytest.raises(PlanError, match="not aligned"):
        check_alignment(units, chunks=CHUNKS, counts=COUNTS)


def test_unit_past_the_end_is_refused() -> None:
    units = plan_units(STORE)
    units[2] = WorkUnit(unit_id=2, group="g000", start=4, stop=6)
    with pytest.raises(PlanError, match="not aligned"):
        check_alignment(units, chunks=CHUNKS, counts=COUNTS)


def test_overlap_is_refused() -> None:
    units = plan_units(STORE)
    units.append(WorkUnit(unit_id=4, group="g000", start=2, stop=4))
    with pytest.raises(PlanError, match="overlap"):
        check_alignment(units, chunks=CHUNKS, counts=COUNTS)


@pytest.mark.parametrize("dropped", [0, 1, 2, 3])
def test_gap_is_refused(dropped: int) -> None:
    units = plan_units(STORE)
    gone = units.pop(dropped)
    with pytest.raises(PlanError, match=f"group '{gone.group}'.*no unit"):
        check_alignment(units, chunks=CHUNKS, counts=COUNTS)


def test_unknown_group_is_refused() -> None:
    units = plan_units(STORE) + [WorkUnit(unit_id=4, group="g999", start=0, stop=1)]
    with pytest.raises(PlanError, match="g999"):
        check_alignment(units, chunks=CHUNKS, counts=COUNTS)


def test_empty_unit_is_refused() -> None:
    units = plan_units(STORE) + [WorkUnit(unit_id=4, group="g001", start=3, stop=3)]
    with pytest.raises(PlanError):
        check_alignment(units, chunks=CHUNKS, counts=COUNTS)


def test_output_with_other_chunking_is_refused() -> None:
    units = plan_units(STORE)
    with pytest.raises(PlanError, match="chunks of 3 images"):
        check_alignment(units, chunks={"g000": (3, 4, 6), "g001": (3, 8, 8)}, counts=COUNTS)


def _tiled(name: str, count: int, h: int, w: int, tile: int) -> GroupInfo:
    return GroupInfo(name=name, height=h, width=w, channels=1, dtype="uint8", count=count, chunk_images=1, tile=tile)


@settings(max_examples=50, deadline=None)
@given(h=st.integers(1, 300), w=st.integers(1, 300), tile=st.integers(16, 128), count=st.integers(1, 3))
def test_tiled_groups_give_one_unit_per_block(h, w, tile, count) -> None:
    store = _store(_group("g000", 5, 2), _tiled("g001", count, h, w, tile))
    units = plan_units(store)
    chunks, counts = _layout(store)
    check_alignment(units, chunks=chunks, counts=counts)  # also for non-square chunks at the edges
    blocks = [u for u in units if u.window is not None]
    assert len(blocks) == count * -(-h // tile) * -(-w // tile)
    assert len({(u.start, u.window) for u in blocks}) == len(blocks)
    with pytest.raises(PlanError):
        check_alignment(units[:-1], chunks=chunks, counts=counts)  # a block without a unit
    whole = plan_units(store, tiled=False)
    assert all(u.window is None for u in whole)
    if h > tile or w > tile:  # output chunked in blocks: whole-image units would straddle them
        with pytest.raises(PlanError, match="whole images"):
            check_alignment(whole, chunks=chunks, counts=counts)
    else:  # one block is the whole image
        check_alignment(whole, chunks=chunks, counts=counts)


def test_overlapping_blocks_are_refused() -> None:
    store = _store(_tiled("g000", 1, 200, 200, 64))
    units = plan_units(store)
    chunks, counts = _layout(store)
    dup = WorkUnit(unit_id=99, group="g000", start=0, stop=1, window=units[0].window)
    with pytest.raises(PlanError, match="same block"):
        check_alignment(units + [dup], chunks=chunks, counts=counts)
    shifted = units[:-1] + [WorkUnit(unit_id=99, group="g000", start=0, stop=1,
                                     window=type(units[0].window)(5, 69, 0, 64))]
    with pytest.raises(PlanError, match="not aligned"):
        check_alignment(shifted, chunks=chunks, counts=counts)


def test_a_packages_halo_and_size_step_shape_the_default_tiling():
    from segcore.models.checkpoint import ModelMeta
    from segcore.run.plan import resolve_tiling

    meta = ModelMeta(arch="bioimageio:x", class_names=("background", "cell"), in_channels=1, runtime="torchscript",
                     input_multiple=24, halo=40)
    tiling = resolve_tiling(meta, tile_size=None, overlap=None)
    assert tiling.tile == 528 and tiling.overlap == 132  # 512 -> next multiple of 24 = 528; 528 // 4 > 2 * 40
    meta = meta.model_copy(update={"halo": 200})
    tiling = resolve_tiling(meta, tile_size=None, overlap=None)
    assert tiling.tile == 816 and tiling.overlap == 400  # ceil(801 / 24) * 24; 2 * halo
    assert resolve_tiling(meta, tile_size=None, overlap=10).overlap == 10  # given overlap wins


def test_large_images_stored_whole_are_named_for_a_tiled_run():
    from segcore.run.context import Tiling
    from segcore.run.plan import large_whole_groups

    store = _store(_group("g000", 3, 1, h=2500, w=3000),  # whole (--tile-chunk 0): 7.5 Mpx
                   _group("g001", 20, 20, h=256, w=256),  # small images
                   GroupInfo(name="g002", height=4096, width=4096, channels=1, dtype="uint8", count=1,
                             chunk_images=1, tile=1024),  # stored in blocks: tiled
                   GroupInfo(name="g003", height=3000, width=3000, channels=1, dtype="uint8", count=8,
                             chunk_images=8, volume="v"))  # the slices of a volume
    tiling = Tiling(tile=512, overlap=128, blend="gaussian", tta=False)
    assert large_whole_groups(store, tiling) == ["g000 (3 image(s) of 3000 x 2500 px)"]
    assert large_whole_groups(store, None) == []  # --tile-size 0: whole is what was asked for
    assert large_whole_groups(store, Tiling(tile=4096, overlap=0, blend="gaussian", tta=False)) == []
