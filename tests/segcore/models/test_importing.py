"""Importing models: nothing is unpickled, weights must fit, formats are recognised, records read."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from flows.cli import main
from segcore.errors import CheckpointError, ConfigError, NotFound
from segcore.models.importing import detect_format, import_model
from segcore.models.record import META_FILE, local_record, model_sha256, read_model_meta
from segcore.models.predict import open_predictor


class Payload:
    """Unpickling this object runs a shell command that creates ``marker``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    control = tmp_path / "control-ran"
    torch.save({"weight": torch.zeros(2), "x": Payload(str(control))}, path)
    torch.load(path, weights_only=False)  # the control: plain unpickling runs the payload
    assert control.exists()
    control.unlink()
    assert main(["model", "import", str(path), "--out", str(tmp_path / "m.safetensors"), "--arch", "unet",
                 "--class-names", "bg,fg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segflow: error: ") and "never unpickles" in err and "posix.system" in err
    assert err.count("\n") == 1
    assert not control.exists() and not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("content", [b"hello\n", bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8)),
                                     b"\x80\x02}q\x00."])
def test_a_file_torch_save_did_not_write_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "notmodel.pth"
    path.write_bytes(content)
    assert main(["model", "import", str(path), "--out", str(tmp_path / "m.safetensors"), "--arch", "unet",
                 "--class-names", "bg,fg"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"segflow: error: ") and err.count("\n") == 1 and "notmodel.pth" in err
    assert "pickle payload" not in err and not (tmp_path / "m.safetensors").exists()


def test_weights_that_do_not_fit_are_refused(tmp_path):
    from segcore.models import create_model

    torch.save(create_model("unet", base=4, depth=2).state_dict(), tmp_path / "u.pth")
    with pytest.raises(CheckpointError, match=r"do not fit 'unet' with \{'base': 4, 'depth': 3\}: \d+ missing "
                                              r"\(down\.2\.0\.weight, .*, \.\.\.\); \d+ of another shape "
                                              r"\(bottleneck\.0\.weight \(16, 8, 3, 3\) in the file, \(32, 16, 3, 3\) "
                                              r"in the model"):
        import_model(tmp_path / "u.pth", out=tmp_path / "m.safetensors", arch="unet", class_names="bg,fg",
                     arch_kwargs={"base": 4, "depth": 3})
    with pytest.raises(ConfigError, match="needs --arch"):
        import_model(tmp_path / "u.pth", out=tmp_path / "m.safetensors", class_names="bg,fg")
    with pytest.raises(ConfigError, match="is a semantic model, not instance"):
        import_model(tmp_path / "u.pth", out=tmp_path / "m.safetensors", arch="unet", class_names="bg,fg",
                     kind="instance")
    meta = import_model(tmp_path / "u.pth", out=tmp_path / "m.safetensors", arch="unet", class_names="bg,fg",
                        arch_kwargs={"base": 4, "depth": 2})
    assert meta.source["format"] == "state_dict" and meta.runtime == "torch" and meta.in_channels == 1


def test_a_wrong_class_count_channel_count_or_dimensionality_names_the_option_that_fixes_it(tmp_path):
    from segcore.models import create_model

    torch.save(create_model("unet", in_channels=1, num_classes=3, base=4, depth=2).state_dict(), tmp_path / "u.pth")
    kwargs = {"base": 4, "depth": 2}
    with pytest.raises(CheckpointError, match="gives 3 class scores per pixel but 2 class names were given: give 3 "
                                              "names to --class-names$"):
        import_model(tmp_path / "u.pth", out=tmp_path / "m.safetensors", arch="unet", class_names="bg,fg",
                     arch_kwargs=kwargs)
    with pytest.raises(CheckpointError, match="takes 1 input channel\(s\), not 2: give --in-channels 1$"):
        import_model(tmp_path / "u.pth", out=tmp_path / "m.safetensors", arch="unet", class_names="bg,a,b",
                     arch_kwargs=kwargs, in_channels=2)
    torch.save(create_model("unet3d", in_channels=1, num_classes=3, base=4, depth=2).state_dict(), tmp_path / "v.pth")
    with pytest.raises(CheckpointError, match="its model is volumetric \(3-D\), this architecture takes 2-D images"):
        import_model(tmp_path / "v.pth", out=tmp_path / "m.safetensors", arch="unet", class_names="bg,a,b",
                     arch_kwargs=kwargs)
    with pytest.raises(ConfigError, match="unknown --arch 'UNET' \(did you mean 'unet'\?\)"):
        import_model(tmp_path / "u.pth", out=tmp_path / "m.safetensors", arch="UNET", class_names="bg,a,b")
    assert not (tmp_path / "m.safetensors").exists()


def test_builders_refusing_arguments_in_their_own_way_are_one_line_errors():
    from segcore.models import create_model

    pytest.importorskip("segmentation_models_pytorch")
    with pytest.raises(ConfigError, match="bad arguments for model 'smp:Unet': Wrong encoder name `resnet999`"):
        create_model("smp:Unet", encoder_name="resnet999")


def test_monai_networks_take_monais_own_arguments_and_refuse_a_third_dimension():
    from segcore.models import create_model

    pytest.importorskip("monai")
    small = {"channels": [4, 8, 16], "strides": [2, 2]}
    a = create_model("monai:UNet", in_channels=1, num_classes=3, **small)
    b = create_model("monai:UNet", in_channels=1, num_classes=3, spatial_dims=2, out_channels=3, kernel_size=5, **small)
    assert [tuple(t.shape) for t in a.state_dict().values()] != [tuple(t.shape) for t in b.state_dict().values()]
    with pytest.raises(ConfigError, match="registered for 2-D images \(spatial_dims 2\), not spatial_dims 3"):
        create_model("monai:UNet", num_classes=3, spatial_dims=3, **small)
    with pytest.raises(ConfigError, match="out_channels 4 but 3 class names were given"):
        create_model("monai:BasicUNet", num_classes=3, out_channels=4)


def test_state_dicts_of_segflows_own_unets_import_with_the_options_segflow_train_gives_them(tmp_path):
    from segcore.config import train_defaults
    from segcore.models import create_model
    from segcore.training.from_store import VOLUME_DEFAULTS

    for arch, trained in (("unet", train_defaults("semantic")["arch_kwargs"]),
                          ("unet3d", VOLUME_DEFAULTS["arch_kwargs"])):
        torch.save(create_model(arch, **trained).state_dict(), tmp_path / f"{arch}.pth")
        meta = import_model(tmp_path / f"{arch}.pth", out=tmp_path / f"{arch}.safetensors", arch=arch,
                            class_names="bg,fg")
        assert meta.arch_kwargs == trained and meta.spatial_dims == (3 if arch == "unet3d" else 2)
    # the builder's own defaults (depth 4) still import without options, as they did before
    torch.save(create_model("unet").state_dict(), tmp_path / "deep.pth")
    assert import_model(tmp_path / "deep.pth", out=tmp_path / "d.safetensors", arch="unet",
                        class_names="bg,fg").arch_kwargs == {"base": 16, "depth": 4}
    # other options: the error names every set of options tried, and where others go
    torch.save(create_model("unet", base=8, depth=2).state_dict(), tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"do not fit 'unet' with \{'base': 16, 'depth': 3\}: .*; nor with "
                                              r"\{'base': 16, 'depth': 4\}: .*; other options go in --arch-kwargs$"):
        import_model(tmp_path / "other.pth", out=tmp_path / "o.safetensors", arch="unet", class_names="bg,fg")
    assert import_model(tmp_path / "other.pth", out=tmp_path / "o.safetensors", arch="unet", class_names="bg,fg",
                        arch_kwargs={"base": 8, "depth": 2}).arch_kwargs == {"base": 8, "depth": 2}


def test_a_state_dict_saved_from_data_parallel_imports_and_other_prefixes_are_named(tmp_path):
    from segcore.models import create_model
    from segcore.models.checkpoint import load_checkpoint

    unet = create_model("unet", base=4, depth=2)
    torch.save(torch.nn.DataParallel(unet).state_dict(), tmp_path / "ddp.pth")  # every name under 'module.'
    meta = import_model(tmp_path / "ddp.pth", out=tmp_path / "m.safetensors", arch="unet", class_names="bg,fg",
                        arch_kwargs={"base": 4, "depth": 2})
    assert meta.provenance["name_prefix_removed"] == "module."
    loaded, _ = load_checkpoint(tmp_path / "m.safetensors")
    assert all(torch.equal(t, unet.state_dict()[k]) for k, t in loaded.state_dict().items())
    torch.save({f"net.{k}": v for k, v in unet.state_dict().items()}, tmp_path / "wrapped.pth")
    with pytest.raises(CheckpointError, match=r"\d+ missing .*; \d+ unexpected \(net\..*; the file's names carry "
                                              r"the prefix 'net\.': save the inner model's state_dict"):
        import_model(tmp_path / "wrapped.pth", out=tmp_path / "w.safetensors", arch="unet", class_names="bg,fg",
                     arch_kwargs={"base": 4, "depth": 2})


def test_torchscript_and_onnx_files_import_as_directory_records(tmp_path):
    net = torch.nn.Conv2d(2, 3, 3, padding=1).eval()
    torch.jit.trace(net, torch.zeros(1, 2, 8, 8)).save(str(tmp_path / "net.pt"))
    torch.onnx.export(net, (torch.zeros(1, 2, 8, 8),), str(tmp_path / "net.onnx"), dynamo=False,
                      input_names=["x"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    assert detect_format(tmp_path / "net.pt") == "torchscript" and detect_format(tmp_path / "net.onnx") == "onnx"
    images = np.random.default_rng(0).integers(0, 256, (2, 11, 13, 2), dtype=np.uint8)
    labels = []
    for name in ("net.pt", "net.onnx"):
        out = tmp_path / f"{name}.segflow"
        meta = import_model(tmp_path / name, out=out, in_channels=2)
        assert meta.class_names == ("background", "class_1", "class_2") and meta.source["file"] == name
        assert read_model_meta(out) == meta and (out / META_FILE).is_file()
        labels.append(open_predictor(out, precision="fp32").labels(images))
    np.testing.assert_array_equal(labels[0], labels[1])
    with pytest.raises(ConfigError, match="--in-channels"):
        import_model(tmp_path / "net.onnx", out=tmp_path / "x.segflow")
    with pytest.raises(CheckpointError, match="failed on a \\(1, 1,"):
        import_model(tmp_path / "net.pt", out=tmp_path / "y.segflow", in_channels=1)


def test_a_record_replaces_a_record_but_never_a_folder_of_other_files(tmp_path, capsys):
    torch.jit.trace(torch.nn.Conv2d(1, 2, 1).eval(), torch.zeros(1, 1, 8, 8)).save(str(tmp_path / "net.pt"))
    argv = ["model", "import", str(tmp_path / "net.pt"), "--in-channels", "1", "--normalisation", "range", "--out"]
    folder = tmp_path / "models"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    assert main([*argv, str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is a directory that is not a model record (it holds notes.txt, sub)" in err and "model.segflow" in err
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "sub").is_dir()
    assert main([*argv, str(folder), "--overwrite"]) == 2  # not a record: never replaced
    assert "is a directory that is not a model record" in capsys.readouterr().err and (folder / "notes.txt").exists()
    record = folder / "model.segflow"
    assert main([*argv, str(record)]) == 0
    before = (record / META_FILE).read_text()
    assert main([*argv, str(record)]) == 2  # an existing record: replaced only when asked
    assert f"{str(record)!r} exists; give a new --out, or pass --overwrite to replace it" in capsys.readouterr().err
    assert (record / META_FILE).read_text() == before
    assert main([*argv, str(record), "--overwrite"]) == 0
    assert sorted(p.name for p in record.iterdir()) == [META_FILE, "model.ts"]
    from segcore.models import create_model

    torch.save(create_model("unet", base=4, depth=2).state_dict(), tmp_path / "sd.pth")
    assert main(["model", "import", str(tmp_path / "sd.pth"), "--arch", "unet", "--arch-kwargs", '{"depth": 2}',
                 "--class-names", "a,b", "--out", str(record)]) == 2  # a checkpoint file cannot replace a record
    assert "is a directory; a torch checkpoint is a file" in capsys.readouterr().err
    source = ["model", "import", str(tmp_path / "net.pt"), "--in-channels", "1", "--out", str(tmp_path / "net.pt")]
    for extra in ([], ["--overwrite"]):  # the model read is never replaced
        assert main([*source, *extra]) == 2
        assert "is the model being read; give another name" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main([*argv, str(tmp_path / "empty")]) == 0 and (tmp_path / "empty" / META_FILE).is_file()
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "net.onnx")]) == 2  # a model file's name: not made a directory
    assert "net.onnx' names a file; a torchscript model record is a directory (e.g. net.segflow)" in capsys.readouterr().err
    assert not (tmp_path / "net.onnx").exists()


def test_a_ct_model_from_elsewhere_keeps_its_hounsfield_normalisation(tmp_path, capsys):
    """``--normalisation ct:LO,HI,MEAN,STD`` (and ``window:...``) on import: the record carries the
    fitted transform and the predictor applies it to raw Hounsfield units."""
    net = torch.nn.Conv2d(1, 2, 1).eval()
    torch.jit.trace(net, torch.zeros(1, 1, 8, 8)).save(str(tmp_path / "ct.pt"))
    out = tmp_path / "ct.segflow"
    assert main(["model", "import", str(tmp_path / "ct.pt"), "--out", str(out), "--in-channels", "1",
                 "--class-names", "background,liver", "--normalisation", "ct:-20,180,90,50"]) == 0
    norm = read_model_meta(out).normalisation
    assert (norm.mode, norm.clip_low, norm.clip_high, norm.mean, norm.std) == ("ct", (-20.0,), (180.0,), (90.0,),
                                                                                (50.0,))
    capsys.readouterr()
    assert main(["model", "info", str(out)]) == 0  # the values the scheme uses, no others
    assert "normalisation: ct (clip -20..180, mean 90, std 50)\n" in capsys.readouterr().out
    hu = np.array([[-1000.0, 40.0], [140.0, 3000.0]], dtype=np.float32)[None, :, :, None]
    x = open_predictor(out, precision="fp32").prepare(hu)
    torch.testing.assert_close(x[0, 0], torch.tensor([[-2.2, -1.0], [1.0, 1.8]]))
    assert main(["model", "import", str(tmp_path / "ct.pt"), "--out", str(tmp_path / "w.segflow"), "--in-channels",
                 "1", "--normalisation", "window:abdomen"]) == 0
    assert read_model_meta(tmp_path / "w.segflow").normalisation.window == (-160.0, 240.0)
    capsys.readouterr()
    assert main(["model", "import", str(tmp_path / "ct.pt"), "--out", str(tmp_path / "bad.segflow"), "--in-channels",
                 "1", "--normalisation", "ct"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segflow: error: ") and "ct:LO,HI,MEAN,STD" in err and err.count("\n") == 1
    assert not (tmp_path / "bad.segflow").exists()


def test_records_are_read_and_hashed_with_clear_errors(tmp_path):
    net = torch.nn.Conv2d(1, 2, 1)
    torch.jit.trace(net, torch.zeros(1, 1, 4, 4)).save(str(tmp_path / "n.pt"))
    rec = tmp_path / "n.segflow"
    import_model(tmp_path / "n.pt", out=rec, in_channels=1, class_names="bg,fg")
    sha = model_sha256(rec)
    assert sha == model_sha256(rec) and len(sha) == 64
    (rec / "model.ts").write_bytes(b"x")
    assert model_sha256(rec) != sha
    (rec / "model.ts").unlink()
    with pytest.raises(CheckpointError, match="lacks its model file model.ts"):
        read_model_meta(rec)
    (rec / META_FILE).write_text(json.dumps({"format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99.*Upgrade segflow"):
        read_model_meta(rec)
    (rec / META_FILE).unlink()
    with pytest.raises(CheckpointError, match="without model.json"):
        read_model_meta(rec)
    with pytest.raises(NotFound):
        read_model_meta(tmp_path / "none")
    with pytest.raises(NotFound, match="does not exist"), local_record(tmp_path / "none"):
        pass
    with local_record(rec) as local:  # a local record is used where it is, whatever it holds
        assert local == str(rec)


def test_model_info_says_what_the_record_holds(tmp_path, capsys):
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    torch.save(maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).state_dict(), tmp_path / "v2.pth")
    assert main(["model", "import", str(tmp_path / "v2.pth"), "--out", str(tmp_path / "v2.safetensors"),
                 "--arch", "torchvision:maskrcnn_resnet50_fpn_v2", "--class-names", "coco"]) == 0
    capsys.readouterr()
    assert main(["model", "info", str(tmp_path / "v2.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "instance" and info["runtime"] == "torch" and len(info["classes"]) == 91
    assert info["classes"][:2] == ["__background__", "person"] and info["input"]["channels"] == 3
    assert info["normalisation"]["mode"] == "range" and info["normalisation"]["scale"] == 255.0
    assert info["source"]["sha256"] == model_sha256(tmp_path / "v2.pth") and info["source"]["file"] == "v2.pth"
    assert "(higher scores win overlaps)" in info["output"]  # torchvision's pasting: every detection kept
    assert main(["model", "export", str(tmp_path / "v2.safetensors"), "--to", "onnx", "--out",
                 str(tmp_path / "v2.segflow")]) == 2
    assert "instance model" in capsys.readouterr().err


def test_model_info_of_a_volumetric_model_describes_volumes(tmp_path):
    from flows.cli import info_text
    from segcore.models import create_model
    from segcore.models.checkpoint import ModelMeta, save_checkpoint
    from segcore.models.record import describe_model
    from segcore.normalise import Normalisation

    meta = ModelMeta(arch="unet3d", arch_kwargs={"base": 4, "depth": 2}, class_names=("background", "a", "b"),
                     in_channels=1, input_axes="bczyx", normalisation=Normalisation(mode="range", scale=255.0))
    path = save_checkpoint(tmp_path / "u3.safetensors", create_model("unet3d", in_channels=1, num_classes=3, base=4,
                                                                       depth=2), meta)
    info = describe_model(path)
    assert info["output"].startswith("(N, 3, D, H, W) float logits for (N, 1, D, H, W) float32 inputs")
    assert "(D, H, W) uint8 class ids" in info["output"]
    assert "axes bczyx, 1 channel(s), float32, any D, H and W" in info_text(info)
    from segcore.models.export import export_model

    exported = export_model(path, to="onnx", out=tmp_path / "u3.segflow")  # padded on every spatial axis
    assert exported.input_axes == "bczyx"
    assert "axes bczyx, 1 channel(s), float32, D, H and W padded to multiples of 4" in info_text(
        describe_model(tmp_path / "u3.segflow"))


def test_a_traced_unet_that_needs_padded_sizes_is_told_at_import(tmp_path):
    from segcore.models import create_model

    net = create_model("unet", in_channels=1, num_classes=3, base=4, depth=2).eval()
    torch.jit.trace(net, torch.zeros(1, 1, 64, 64)).save(str(tmp_path / "unet.pt"))
    with pytest.raises(CheckpointError, match=r"ran on a \(1, 1, 48, 56\) batch but failed on \(61, 59\) .*"
                                              r"give --input-multiple M"):
        import_model(tmp_path / "unet.pt", out=tmp_path / "a.segflow", in_channels=1)
    assert not (tmp_path / "a.segflow").exists()
    meta = import_model(tmp_path / "unet.pt", out=tmp_path / "b.segflow", in_channels=1, input_multiple=4)
    assert meta.input_multiple == 4 and len(meta.class_names) == 3


def test_normalisations_no_run_could_apply_are_refused_at_import(tmp_path, capsys):
    from segcore.models import create_model

    torch.save(create_model("unet", in_channels=1, num_classes=2, base=4, depth=2).state_dict(), tmp_path / "sd.pth")
    common = ["model", "import", str(tmp_path / "sd.pth"), "--out", str(tmp_path / "m.safetensors"), "--arch", "unet",
              "--arch-kwargs", '{"base": 4, "depth": 2}', "--class-names", "bg,fg", "--normalisation"]
    for choice, says in (("zscore:nan,1", "must be finite numbers"), ("ct:-inf,inf,0,1", "must be finite numbers"),
                         ("imagenet", "does not fit this model: the model's normalisation has 3 mean value(s)")):
        assert main([*common, choice]) == 2
        err = capsys.readouterr().err
        assert err.startswith("segflow: error: ") and says in err and err.count("\n") == 1, err
    assert not (tmp_path / "m.safetensors").exists()
