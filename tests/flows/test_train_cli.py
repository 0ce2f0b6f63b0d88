"""`segflow train` end to end on tiny stores: options merge over the model's defaults, UNet and
instance training without a validation split, and options a model does not take are refused up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.cli import main
from segcore.models.checkpoint import read_meta
from segcore.config import ExecutionSpec
from segcore.synthetic import generate_collection, generate_instance_collection
from tests.flows.conftest import module_cluster

_cluster = module_cluster(ExecutionSpec())  # what the commands below run on (no --workers given)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("train")
    generate_collection(root / "sem", n_images=6, size=32, seed=0)
    generate_instance_collection(root / "inst", n_images=3, size=64, seed=0)
    for name, kind in (("sem", "class"), ("inst", "instance")):
        assert main(["ingest", "--images", str(root / name / "images"), "--masks", str(root / name / "masks"),
                     "--mask-kind", kind, "--store", str(root / f"{name}.zarr")]) == 0
    return {"root": root, "sem": str(root / "sem.zarr"), "inst": str(root / "inst.zarr")}


def test_unet_options_merge_over_the_defaults(stores) -> None:
    out = Path(stores["root"]) / "unet.safetensors"
    assert main(["train", "--store", stores["sem"], "--model", "unet", "--out", str(out), "--epochs", "1",
                 "--base", "4", "--batch-size", "4"]) == 0
    meta = read_meta(out)
    assert meta.arch_kwargs == {"base": 4, "depth": 3}
    assert meta.provenance["command"].startswith("segflow") and meta.provenance["n_val"] == 1
    assert meta.provenance["recipe"]["min_epoch_patches"] == 256  # 5 training images: 256 patches an epoch
    one_pass = Path(stores["root"]) / "unet-one-pass.safetensors"
    assert main(["train", "--store", stores["sem"], "--model", "unet", "--out", str(one_pass), "--epochs", "1",
                 "--base", "4", "--batch-size", "4", "--epoch-patches", "0"]) == 0
    assert read_meta(one_pass).provenance["recipe"]["min_epoch_patches"] == 0


def test_the_largest_region_option_is_stored_decided_and_reported(stores, capsys) -> None:
    out = Path(stores["root"]) / "largest.safetensors"
    assert main(["train", "--store", stores["sem"], "--model", "unet", "--out", str(out), "--epochs", "1",
                 "--base", "4", "--batch-size", "4", "--largest-region", "on"]) == 0
    meta = read_meta(out)
    decided = meta.provenance["largest_region"]
    assert meta.output.largest_region and decided["choice"] == "on" and decided["kept"]
    with_, without = decided["val_dice_mean_fg_with"], decided["val_dice_mean_fg_without"]
    digits = 4 if f"{with_:.4f}" != f"{without:.4f}" else 6
    assert f"largest foreground region of each image: kept (validation mean foreground Dice " \
           f"{with_:.{digits}f} with it" in capsys.readouterr().out
    auto = Path(stores["root"]) / "largest-auto.safetensors"
    assert main(["train", "--store", stores["sem"], "--model", "unet", "--out", str(auto), "--epochs", "1",
                 "--base", "4", "--batch-size", "4"]) == 0
    decided = read_meta(auto).provenance["largest_region"]
    assert decided["choice"] == "auto"
    assert decided["kept"] == (decided["val_dice_mean_fg_with"] > decided["val_dice_mean_fg_without"])
    assert read_meta(auto).output.largest_region == decided["kept"]
    bad = Path(stores["root"]) / "largest-instance.safetensors"
    assert main(["train", "--store", stores["inst"], "--model", "maskrcnn_r18", "--out", str(bad), "--epochs", "1",
                 "--val-fraction", "0", "--largest-region", "on"]) == 2
    assert "--largest-region applies to semantic models only" in capsys.readouterr().err and not bad.exists()


def test_refit_trains_again_on_every_image_and_says_so(stores, capsys) -> None:
    out = Path(stores["root"]) / "refit.safetensors"
    assert main(["train", "--store", stores["sem"], "--model", "unet", "--out", str(out), "--epochs", "2",
                 "--base", "4", "--batch-size", "4", "--epoch-patches", "0", "--refit"]) == 0
    p = read_meta(out).provenance
    assert p["recipe"]["refit"] and p["refit"]["done"] and p["refit"]["images"] == p["images"] == 6
    assert p["refit"]["epochs"] == p["best_epoch"] and p["n_train"] == 5
    out_text = capsys.readouterr().out
    assert f"refit on all 6 images for {p['best_epoch']} epochs: the checkpoint holds that model" in out_text
    assert f"validation: 1 of 6 images held out ({p['val_split']} split)" in out_text
    bad = Path(stores["root"]) / "refit-instance.safetensors"
    assert main(["train", "--store", stores["inst"], "--model", "maskrcnn_r18", "--out", str(bad), "--epochs", "1",
                 "--val-fraction", "0", "--refit"]) == 2
    assert "refit applies to semantic models only" in capsys.readouterr().err and not bad.exists()


def test_instance_model_trains_on_everything_with_the_default_score_floor(stores) -> None:
    out = Path(stores["root"]) / "mrcnn.safetensors"
    assert main(["train", "--store", stores["inst"], "--model", "maskrcnn_r18", "--out", str(out), "--epochs", "1",
                 "--val-fraction", "0", "--crop-size", "48", "--class-names", "background,nucleus"]) == 0
    meta = read_meta(out)
    assert meta.arch_kwargs == {"score_threshold": 0.7, "overlap_threshold": 0.5}
    assert meta.provenance["n_val"] == 0 and meta.class_names == ("background", "nucleus")


def test_the_overlap_threshold_option_is_stored_and_checked(stores, capsys) -> None:
    out = Path(stores["root"]) / "every-detection.safetensors"
    assert main(["train", "--store", stores["inst"], "--model", "maskrcnn_r18", "--out", str(out), "--epochs", "1",
                 "--val-fraction", "0", "--crop-size", "48", "--overlap-threshold", "1"]) == 0
    assert read_meta(out).arch_kwargs == {"score_threshold": 0.7, "overlap_threshold": 1.0}
    bad = Path(stores["root"]) / "bad-overlap.safetensors"
    assert main(["train", "--store", stores["inst"], "--model", "maskrcnn_r18", "--out", str(bad), "--epochs", "1",
                 "--val-fraction", "0", "--crop-size", "48", "--overlap-threshold", "0"]) == 2
    assert "--overlap-threshold is a share" in capsys.readouterr().err and not bad.exists()


def test_options_a_model_does_not_take_are_refused(stores, capsys) -> None:
    out = Path(stores["root"]) / "bad.safetensors"
    assert main(["train", "--store", stores["sem"], "--model", "unet", "--out", str(out),
                 "--score-threshold", "0.5"]) == 2
    assert capsys.readouterr().err == ("segflow: error: --score-threshold does not apply to --model unet; its "
                                       "options here: --base, --depth\n")
    assert main(["train", "--store", stores["inst"], "--model", "maskrcnn", "--out", str(out),
                 "--base", "8", "--depth", "2"]) == 2
    assert capsys.readouterr().err == ("segflow: error: --base, --depth do not apply to --model maskrcnn; its "
                                       "options here: --score-threshold, --overlap-threshold\n")
    assert not out.exists()


def test_a_unet_trains_on_every_image_with_val_fraction_0_and_says_so(stores, capsys) -> None:
    out = Path(stores["root"]) / "unet-all.safetensors"
    assert main(["train", "--store", stores["sem"], "--model", "unet", "--out", str(out), "--epochs", "2",
                 "--base", "4", "--batch-size", "4", "--epoch-patches", "0", "--val-fraction", "0",
                 "--group-pattern", r"^(\w+)_"]) == 0
    p = read_meta(out).provenance
    assert (p["n_train"], p["n_val"], p["val_split"], p["best_epoch"], p["val_dice"]) == (6, 0, None, None, None)
    text = capsys.readouterr().out
    assert ("no validation (val fraction 0): trained on all 6 images; the checkpoint holds the last epoch's weights "
            "(epoch 2 of 2), not a best epoch") in text
    assert "largest foreground region of each image: not kept (no validation images to decide by" in text
    assert "best validation" not in text and "held out" not in text and "Dice per class" not in text


@pytest.mark.parametrize("argv, message", [
    (["--val-fraction", "0", "--refit"], "refit (--refit) trains again on every image after a run with a validation "
                                         "split, and val_fraction 0 (--val-fraction 0) holds out none"),
    (["--val-fraction", "1"], "--val-fraction: must lie in [0, 1): the share of the labelled images held out for "
                              "validation, 0 for none"),
    (["--val-fraction", "-0.5"], "--val-fraction: must lie in [0, 1)"),
])
def test_validation_options_that_cannot_work_are_refused_before_training(stores, capsys, argv, message) -> None:
    out = Path(stores["root"]) / "refused.safetensors"
    assert main(["train", "--store", stores["sem"], "--model", "unet", "--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_auto_normalisation_picks_ct_for_hounsfield_units_and_says_so(tmp_path, capsys) -> None:
    """Real CT slices (float32 HU): ingest records the fingerprint, auto picks ct, the fitted values
    and the choice are in the checkpoint, and the summary prints the best epoch's Dice per class."""
    ct = Path(__file__).resolve().parents[1] / "data" / "ct-liver"
    store, out = tmp_path / "ct.zarr", tmp_path / "ct.safetensors"
    assert main(["ingest", "--images", str(ct / "images"), "--masks", str(ct / "masks"), "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["train", "--store", str(store), "--out", str(out), "--epochs", "1", "--base", "4", "--depth", "2",
                 "--class-names", "background,liver,tumour", "--val-fraction", "0.5",
                 "--group-pattern", r"ct_z0(\d)"]) == 0
    text = capsys.readouterr().out
    meta = read_meta(out)
    choice = meta.provenance["normalisation_choice"]
    assert (choice["asked"], choice["chose"]) == ("auto", "ct") and choice["fingerprint"]["negative"] is True
    assert meta.normalisation.mode == "ct" and meta.normalisation.clip_low is not None
    assert meta.provenance["val_split"] == "group"
    assert sorted(meta.provenance["val_ids"]) in (["ct_z030", "ct_z031"], ["ct_z070", "ct_z071"])
    assert "validation Dice per class: background" in text and "[auto:" in text and "normalisation: ct" in text


def test_bad_normalisation_choices_are_refused(stores, capsys) -> None:
    out = Path(stores["root"]) / "bad.safetensors"
    assert main(["train", "--store", stores["sem"], "--out", str(out), "--normalisation", "window:5,1"]) == 2
    assert "window" in capsys.readouterr().err and not out.exists()


def test_the_summary_says_when_the_time_budget_stopped_training() -> None:
    from flows.cli import train_summary

    result = {"checkpoint": "m.safetensors", "sha256": "ab", "kind": "instance", "best_val_score": None,
              "best_epoch": 8, "history": [{}] * 8,
              "course": {"epochs": 12, "epochs_run": 8, "stopped_early": True, "time_budget_s": 45.0, "n_train": 3,
                         "n_val": 0}}
    text = train_summary(result)
    assert "stopped by the time budget (45 s) after 8 of 12 epochs" in text and "held out" not in text
    assert "no validation (val fraction 0): trained on all 3 images; the checkpoint holds the last epoch's " \
           "weights (epoch 8 of 12)" in text and "best validation" not in text


def test_the_summary_shows_enough_digits_to_tell_a_near_tie_and_counts_one_image() -> None:
    from flows.cli import train_summary

    result = {"checkpoint": "m.safetensors", "sha256": "ab", "kind": "semantic", "model": "unet",
              "best_val_score": None, "history": [{}] * 2,
              "course": {"epochs": 2, "epochs_run": 2, "n_train": 1, "n_val": 0},
              "largest_region": {"choice": "auto", "kept": True, "val_dice_mean_fg_with": 0.91163,
                                 "val_dice_mean_fg_without": 0.91161}}
    text = train_summary(result)
    assert "kept (validation mean foreground Dice 0.911630 with it, 0.911610 without; --largest-region auto)" in text
    assert "trained on the one image;" in text


def test_the_summary_marks_classes_absent_from_validation_and_gives_the_checkpoints_own_figures() -> None:
    from flows.cli import train_summary

    result = {"checkpoint": "m.safetensors", "sha256": "ab", "kind": "semantic", "model": "unet",
              "best_val_score": 0.80, "best_epoch": 3, "history": [{}] * 4,
              "course": {"epochs": 4, "epochs_run": 4, "n_train": 10, "n_val": 2, "val_split": "tail"},
              "best_val": {"val_dice": {"background": 0.97, "liver": 0.80, "tumour": 1.0}, "val_absent": ["tumour"]},
              "largest_region": {"choice": "auto", "kept": True, "val_dice_mean_fg_with": 0.83,
                                 "val_dice_mean_fg_without": 0.80,
                                 "val_dice_with": {"background": 0.98, "liver": 0.83, "tumour": 1.0}}}
    lines = train_summary(result).splitlines()
    assert lines[1] == ("best validation mean foreground Dice: 0.8000 (epoch 3 of 4); 0.8300 with the largest-region "
                        "rule the checkpoint keeps")
    assert ("validation Dice per class (with that rule): background 0.9800, liver 0.8300, tumour 1.0000 (absent "
            "from the validation images: not in the mean)") in lines
    result["largest_region"]["kept"] = False
    text = train_summary(result)
    assert "validation Dice per class: background 0.9700, liver 0.8000, tumour 1.0000 (absent" in text
    assert "with the largest-region rule" not in text.splitlines()[1]


def test_a_split_the_store_cannot_make_is_refused_before_the_cluster_starts(stores, capsys, monkeypatch) -> None:
    from flows import execution

    def no_cluster(*args, **kwargs):
        raise AssertionError("the cluster was started")

    monkeypatch.setattr(execution, "started_cluster", no_cluster)
    out = str(Path(stores["root"]) / "never.safetensors")
    for extra, said in ((["--val-fraction", "0.99"], "a validation fraction of 0.99 holds out all 6 images"),
                        (["--group-pattern", "^nothing(\\d)"], "matches none of the 6 image ids"),
                        (["--group-pattern", "^(img)"], "puts all 6 images in one group")):
        assert main(["train", "--store", stores["sem"], "--out", out, *extra]) == 2
        err = capsys.readouterr().err
        assert said in err and err.count("\n") == 1, err
    assert not Path(out).exists()
