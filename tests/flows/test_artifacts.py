"""Artifact keys, link targets, flow run names and the throttled progress artifact (on the test server)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from prefect import flow

from flows import artifacts
from flows.artifacts import UnitProgress, artifact_key, location_href
from flows.names import segment_run_name, short_location
from segcore.config import SegmentSpec


def test_artifact_keys_are_lowercase_letters_digits_and_dashes():
    assert artifact_key("dice-summary-20250101T120000-ab12cd") == "dice-summary-20250101t120000-ab12cd"
    assert artifact_key("Run é/1_x") == "run---1-x"  # space, é and / each become a dash
    assert artifact_key("///") == "segflow"
    assert len(artifact_key("a" * 300)) == 100


def test_links_point_at_urls_as_given_and_at_local_paths_as_file_uris(tmp_path):
    assert location_href("s3://bucket/runs/r1/masks.zarr") == "s3://bucket/runs/r1/masks.zarr"
    assert location_href(str(tmp_path / "run" / "dice")) == f"file://{tmp_path}/run/dice"
    assert location_href("run/summary.md") == (Path.cwd() / "run" / "summary.md").as_uri()


def test_short_locations_keep_the_informative_end():
    assert short_location("/data/runs/r1/") == "r1"
    assert short_location("s3://bucket/stores/heldout.zarr") == "heldout.zarr"
    assert short_location("/data/set-a/images", parts=2) == "set-a/images"
    assert short_location("data/**/*.tif", parts=2) == "data/**/*.tif"


def _progress(total: int, advances: int) -> float:
    @flow(name="progress-check", flow_run_name=segment_run_name)
    def progress_flow(spec: SegmentSpec) -> str:
        p = UnitProgress(f"check-{total}-{advances}", total=total, done=0)
        for _ in range(advances):
            p.advance()
        return str(p._id)

    spec = SegmentSpec(store="/data/a.zarr", checkpoint="/m/unet.safetensors", out="s3://b/runs/r7")
    artifact_id = progress_flow(spec)
    from prefect.settings import PREFECT_API_URL

    artifact = httpx.get(f"{PREFECT_API_URL.value()}/artifacts/{artifact_id}", timeout=30).json()
    runs = httpx.post(f"{PREFECT_API_URL.value()}/flow_runs/filter",
                      json={"flow_runs": {"id": {"any_": [artifact["flow_run_id"]]}}}, timeout=30).json()
    assert runs[0]["name"] == "segment a.zarr with unet.safetensors -> r7"
    assert artifact["key"] == f"segment-progress-check-{total}-{advances}" and artifact["type"] == "progress"
    return artifact["data"]


def test_progress_reaches_100_and_is_sent_at_most_20_times(monkeypatch):
    sent: list[float] = []
    update = artifacts.update_progress_artifact

    def counting_update(**kwargs):
        sent.append(kwargs["progress"])
        return update(**kwargs)

    monkeypatch.setattr(artifacts, "update_progress_artifact", counting_update)
    for total in (100, 1000):
        sent.clear()
        assert _progress(total, total) == 100.0
        assert 0 < len(sent) <= 20 and sent[-1] == 100.0, sent
        assert all(a < b for a, b in zip(sent, sent[1:])), sent
    sent.clear()
    assert _progress(10, 10) == 100.0  # fewer units than updates: one update per unit
    assert sent == [10.0 * k for k in range(1, 11)]
    sent.clear()
    # 100 units: the artifact moves in steps of 5 units, so after 7 it still shows the 5th.
    assert _progress(100, 7) == 5.0
    assert sent == [5.0]


def test_run_names_show_the_run_directory_that_flow_run_fills_in():
    from prefect.runtime import flow_run

    @flow(name="name-check", flow_run_name=segment_run_name)
    def named_flow(spec: SegmentSpec) -> str:
        return str(flow_run.id)

    flow_run_id = named_flow(SegmentSpec(store="/data/a.zarr", checkpoint="/m/unet.safetensors",
                                         out="s3://b/runs/{flow_run}"))
    from prefect.settings import PREFECT_API_URL

    [run] = httpx.post(f"{PREFECT_API_URL.value()}/flow_runs/filter",
                       json={"flow_runs": {"id": {"any_": [flow_run_id]}}}, timeout=30).json()
    prefix, token = run["name"].split(" -> ")
    assert prefix == "segment a.zarr with unet.safetensors" and "{" not in token
    assert token.endswith("-" + flow_run_id.replace("-", "")[:8]) and token[8] == "T" and token[15] == "Z"


def test_training_table_rows_flatten_the_per_class_dice_and_the_curve_is_a_png() -> None:
    from flows.artifacts import training_table_rows
    from segcore.figures import training_curve_png

    history = [{"epoch": 1, "loss": 1.234567, "val_dice": {"background": 0.9, "liver": 0.5}, "val_dice_mean_fg": 0.5,
                "lr": 0.001, "seconds": 2.345, "elapsed_s": 2.5},
               {"epoch": 2, "loss": 0.5, "val_dice": {"background": 0.95, "liver": 0.75}, "val_dice_mean_fg": 0.75,
                "lr": 0.0005, "seconds": 2.0, "elapsed_s": 4.5}]
    assert training_table_rows(history)[0] == {"epoch": 1, "loss": 1.23457, "lr": 0.001, "seconds": 2.35,
                                               "val_dice_background": 0.9, "val_dice_liver": 0.5,
                                               "val_dice_mean_fg": 0.5}
    assert training_curve_png(history).startswith(b"\x89PNG")


def test_a_run_without_validation_claims_no_best_epoch_and_draws_the_loss_alone(monkeypatch) -> None:
    from segcore.figures import training_curve_png

    sent = {}
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda **kw: sent.update(table=kw))
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda **kw: sent.update(kw))
    history = [{"epoch": e, "loss": 1.0 / e, "lr": 0.001, "seconds": 1.0, "elapsed_s": float(e)} for e in (1, 2, 3)]
    artifacts.publish_training_artifacts({"history": history, "checkpoint": "m.safetensors", "best_epoch": None,
                                          "best_val": None, "refit": None, "model": "unet3d",
                                          "course": {"epochs": 3, "epochs_run": 3, "n_train": 1, "n_val": 0}},
                                         run_name="r")
    text = sent["markdown"]
    assert ("No validation (val fraction 0): trained on the one volume; the checkpoint holds the last epoch's "
            "weights (epoch 3 of 3), not a best epoch.") in text
    assert "Best epoch" not in text and "validation Dice" not in text
    assert sent["table"]["description"].startswith("Loss per epoch") and "val_dice_mean_fg" not in \
        sent["table"]["table"][0]
    with_nones = [{**r, "val_dice": None, "val_dice_mean_fg": None} for r in history]
    assert training_curve_png(history).startswith(b"\x89PNG") and training_curve_png(with_nones).startswith(b"\x89PNG")


@pytest.mark.parametrize("refit, line", [
    (None, None),
    ({"done": True, "epochs": 7, "images": 64, "loss": 0.2, "seconds": 30.0},
     "Refit on all 64 images for 7 epochs: the checkpoint holds that model"),
    ({"done": False, "epochs": 7, "reason": "time budget spent before the refit"},
     "Refit not done (time budget spent before the refit): the checkpoint holds the validated model."),
])
def test_the_training_curve_artifact_says_what_the_refit_did(monkeypatch, refit, line) -> None:
    sent = {}
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda **kw: None)
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda **kw: sent.update(kw))
    history = [{"epoch": 1, "loss": 0.5, "val_dice": {"background": 0.9, "liver": 0.7}, "val_dice_mean_fg": 0.7,
                "lr": 0.001, "seconds": 1.0, "elapsed_s": 1.0}]
    artifacts.publish_training_artifacts({"history": history, "checkpoint": "m.safetensors", "best_epoch": 1,
                                          "best_val": {"val_dice": history[0]["val_dice"]}, "refit": refit},
                                         run_name="r")
    text = sent["markdown"]
    assert "Best epoch: **1** of 1." in text and "validation Dice liver: 0.7000" in text
    assert ("Refit" not in text) if line is None else (line in text)


def test_progress_messages_start_without_a_rate_and_tell_units_done_before():
    from tasks.progress import listen

    seen: list[str] = []

    @flow(name="progress-messages")
    def progress_flow() -> None:
        with listen(lambda event: seen.append(event.message)):
            p = UnitProgress("messages", total=3, done=1)  # one unit done by an earlier run
            p.advance(images=0)  # a unit whose images were all refused
            p.advance(images=4)

            slow = UnitProgress("slow", total=1)
            slow._t0 -= 600  # one large image in 10 minutes: seconds an image, not 0.0 images/s
            slow.advance(images=1)

    progress_flow()
    assert seen[0] == "1 done by an earlier run"
    assert seen[1].startswith("0 images, ") and seen[2].startswith("4 images, ") and seen[2].endswith(" images/s")
    assert seen[-1].startswith("1 images, ") and seen[-1].endswith(" s/image") and 599 <= int(seen[-1].split()[2]) <= 700
