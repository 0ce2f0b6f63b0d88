"""bioimage.io packages: export checked by the zoo's own tools (offline), import back with bitwise
equal masks, the intensities that a package's preprocessing prescribes (by hand on 3 x 4 images),
refusal of what segflow cannot run, and of unsafe archives and pickled weights."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("bioimageio.core")

from segcore.archives import UnsafeArchive, safe_extract_zip  # noqa: E402
from segcore.errors import ConfigError  # noqa: E402
from segcore.fsio import file_sha256  # noqa: E402
from segcore.models.bioimage.export import build_package_folder, export_bioimageio  # noqa: E402
from segcore.models.bioimage.importer import UnsafeWeights, import_bioimageio  # noqa: E402
from segcore.models.bioimage.prescribe import UnsupportedPackage  # noqa: E402
from segcore.models.checkpoint import read_meta, save_checkpoint  # noqa: E402
from segcore.models.outputs import OutputRule, class_scores  # noqa: E402
from segcore.models.predict import open_predictor  # noqa: E402
from segcore.normalise import Normalisation, ScaleRange, ZeroMeanUnitVariance  # noqa: E402
from segcore.synthetic import make_sample  # noqa: E402
from segcore.training.semantic import train_semantic  # noqa: E402


def _images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    pairs = [make_sample(np.random.default_rng(seed + i), size=size) for i in range(n)]
    return np.stack([p[0] for p in pairs])[..., None], np.stack([p[1] for p in pairs])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A small UNet trained for 6 epochs on synthetic images (non-trivial masks), percentile normalisation."""
    images, masks = _images(32, 64, 0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, meta, _ = train_semantic(images, masks.astype(np.int64), class_names=("background", "disc", "square"),
                                      arch_kwargs={"base": 8, "depth": 2}, normalisation=Normalisation(),
                                      epochs=6, batch_size=8, lr=3e-3, seed=0)
    finally:
        torch.set_num_threads(before)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "unet.safetensors", net, meta)


def test_export_passes_the_zoo_checks_and_imports_back_bitwise(trained: Path, tmp_path: Path) -> None:
    package = export_bioimageio(trained, tmp_path / "unet.zip", authors=["Jane Doe"])  # spec + core test_model
    names = set(zipfile.ZipFile(package).namelist())
    assert {"rdf.yaml", "weights.pt", "weights.torchscript", "test_input.npy", "test_output.npy", "cover.png",
            "README.md"} <= names
    images, _ = _images(3, 96, 100)
    original = open_predictor(trained).labels(images)
    assert len(np.unique(original)) > 1  # the comparison below is not between empty masks
    record, meta = import_bioimageio(package, tmp_path / "back.safetensors")
    assert meta.runtime == "torch" and meta.normalisation == Normalisation()
    assert meta.output == read_meta(trained).output  # argmax, and the trained model's largest-region rule
    assert meta.source["format"] == "bioimageio:pytorch_state_dict"
    np.testing.assert_array_equal(open_predictor(record).labels(images), original)
    scripted, meta_ts = import_bioimageio(package, tmp_path / "back.segflow", weights="torchscript")
    assert meta_ts.runtime == "torchscript" and meta_ts.input_multiple == 4
    np.testing.assert_array_equal(open_predictor(scripted).labels(images), original)


def test_the_largest_region_rule_travels_in_segflows_own_record(trained: Path, tmp_path: Path) -> None:
    from segcore.models.checkpoint import load_checkpoint

    net, meta = load_checkpoint(trained)
    ruled = save_checkpoint(tmp_path / "ruled.safetensors", net,
                            meta.model_copy(update={"output": OutputRule(largest_region=True)}))
    folder = tmp_path / "pkg"
    folder.mkdir()
    rdf = build_package_folder(ruled, folder, authors=["Jane Doe"], license="CC-BY-4.0", name=None,
                               description=None, sample=None)
    assert rdf["config"]["segflow"]["largest_region"] is True
    assert "largest connected foreground region" in (folder / "README.md").read_text()
    _, back = import_bioimageio(folder, tmp_path / "back.safetensors")
    assert back.output == OutputRule(largest_region=True)
    del rdf["config"]  # a package made elsewhere: argmax only
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    assert import_bioimageio(folder, tmp_path / "other.safetensors")[1].output == OutputRule()


CT_NORMS = {"ct": Normalisation(mode="ct", clip_low=(-20.0,), clip_high=(180.0,), mean=(90.0,), std=(45.0,)),
            "window": Normalisation(mode="window", window=(-160.0, 240.0), preset="abdomen")}


@pytest.mark.parametrize("scheme", sorted(CT_NORMS))
def test_a_model_normalised_for_ct_exports_and_imports_back_bitwise(trained: Path, tmp_path: Path,
                                                                    scheme: str) -> None:
    """``ct`` and ``window`` become clip + linear steps that the zoo's model test accepts; imported
    back, the model reads Hounsfield units as the original does."""
    from segcore.models.checkpoint import load_checkpoint

    net, meta = load_checkpoint(trained)
    norm = CT_NORMS[scheme]
    ckpt = save_checkpoint(tmp_path / "ct.safetensors", net, meta.model_copy(update={"normalisation": norm}))
    package = export_bioimageio(ckpt, tmp_path / "ct.zip", authors=["Jane Doe"])  # spec + core test_model
    rdf = yaml.safe_load(zipfile.ZipFile(package).read("rdf.yaml"))
    ops = [p["id"] for p in rdf["inputs"][0]["preprocessing"] if p["id"] != "ensure_dtype"]
    assert ops == (["clip", "fixed_zero_mean_unit_variance"] if scheme == "ct" else ["clip", "scale_linear"])
    images, _ = _images(3, 96, 200)
    hu = images.astype(np.float32) * 1.5 - 120.0  # about -120..260 HU: values on both sides of the clip
    original = open_predictor(ckpt).labels(hu)
    assert len(np.unique(original)) > 1
    record, back = import_bioimageio(package, tmp_path / "back.safetensors")
    assert back.normalisation == norm  # segflow's own record, the same operations as the rdf's
    np.testing.assert_array_equal(open_predictor(record).labels(hu), original)
    del rdf["config"]  # the same package made elsewhere: the rdf's operations, equal up to the spec's eps
    folder = tmp_path / "elsewhere"
    safe_extract_zip(package, folder)
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    record, other = import_bioimageio(folder, tmp_path / "other.safetensors")
    assert other.normalisation.mode == "steps"
    x = hu[:1, :8, :8]
    np.testing.assert_allclose(open_predictor(record).prepare(x).numpy(), open_predictor(ckpt).prepare(x).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_a_package_is_written_to_a_zip_file_only(trained: Path, tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    for out in (tmp_path / "unet", tmp_path / "unet.segflow", tmp_path / "folder"):
        with pytest.raises(ConfigError, match="is not a zip file to write; a bioimage.io package is one"):
            export_bioimageio(trained, out, authors=["Jane Doe"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"] and not any((tmp_path / "folder").iterdir())


def test_a_ct_normalisation_with_clip_bounds_per_channel_is_refused_by_name() -> None:
    from segcore.models.bioimage.prescribe import steps_of

    with pytest.raises(UnsupportedPackage, match="clip bounds differ between channels"):
        steps_of(Normalisation(mode="ct", clip_low=(0.0, 1.0), clip_high=(5.0, 5.0), mean=(1.0, 1.0), std=(1.0, 1.0)))


def _package_with(trained: Path, tmp_path: Path, norm: Normalisation) -> Path:
    """An exported package of ``trained`` whose preprocessing is ``norm``; segflow's own record
    (config.segflow) removed, so import reads the rdf's operations only."""
    from segcore.models.checkpoint import load_checkpoint

    net, meta = load_checkpoint(trained)
    ckpt = save_checkpoint(tmp_path / "n.safetensors", net, meta.model_copy(update={"normalisation": norm}))
    folder = tmp_path / "pkg"
    folder.mkdir()
    rdf = build_package_folder(ckpt, folder, authors=["Jane Doe"], license="CC-BY-4.0", name=None,
                               description=None, sample=None)
    del rdf["config"]
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    return folder


def test_zero_mean_unit_variance_prescription_by_hand(trained: Path, tmp_path: Path) -> None:
    folder = _package_with(trained, tmp_path, Normalisation(mode="steps", steps=(ZeroMeanUnitVariance(),)))
    assert yaml.safe_load((folder / "rdf.yaml").read_text())["inputs"][0]["preprocessing"] == [
        {"id": "zero_mean_unit_variance", "kwargs": {"axes": ["y", "x"], "eps": 1e-6}}]
    record, meta = import_bioimageio(folder, tmp_path / "z.safetensors")
    # Six 7s and six 13s: mean 10, population std 3 -> (x - 10) / (3 + 1e-6) = -+0.999999667.
    image = np.array([[7, 13, 7, 13], [13, 7, 13, 7], [7, 13, 7, 13]], dtype=np.uint16)[None, :, :, None]
    got = open_predictor(record).prepare(image)[0, 0].numpy()
    one = 3.0 / (3.0 + 1e-6)
    np.testing.assert_allclose(got, np.where(image[0, :, :, 0] == 13, one, -one), rtol=0, atol=1e-7)


def test_scale_range_percentile_prescription_by_hand(trained: Path, tmp_path: Path) -> None:
    folder = _package_with(trained, tmp_path, Normalisation(mode="steps", steps=(ScaleRange(low=10.0, high=90.0),)))
    record, meta = import_bioimageio(folder, tmp_path / "s.safetensors")
    assert meta.normalisation.steps == (ScaleRange(low=10.0, high=90.0, per_channel=True),)
    # Values 0..11: p10 at position 1.1 -> 1.1, p90 at 9.9 -> 9.9; out = (x - 1.1) / (8.8 + 1e-6).
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)[None, :, :, None]
    got = open_predictor(record).prepare(image)[0, 0].numpy()
    expected = (np.arange(12).reshape(3, 4) - 1.1) / (8.8 + 1e-6)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert got[0, 0] == pytest.approx(-0.125, abs=1e-6) and got[2, 3] == pytest.approx(1.125, abs=1e-6)


def _edit_rdf(folder: Path, edit) -> None:
    rdf = yaml.safe_load((folder / "rdf.yaml").read_text())
    edit(rdf)
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))


def test_refuses_z_axes_and_unsupported_operations(trained: Path, tmp_path: Path) -> None:
    folder = _package_with(trained, tmp_path, Normalisation())

    def add_z(rdf: dict) -> None:
        rdf["inputs"][0]["axes"].insert(2, {"type": "space", "id": "z", "size": {"min": 1, "step": 1}})

    _edit_rdf(folder, add_z)
    with pytest.raises(UnsupportedPackage, match="space axis 'z'.*2-D"):
        import_bioimageio(folder, tmp_path / "z.safetensors")

    folder2 = _package_with(trained, tmp_path / "b", Normalisation())
    _edit_rdf(folder2, lambda rdf: rdf["inputs"][0]["preprocessing"].__setitem__(
        0, {"id": "scale_range", "kwargs": {"axes": ["batch", "y", "x"], "min_percentile": 1, "max_percentile": 99}}))
    with pytest.raises(UnsupportedPackage, match="batch axis"):
        import_bioimageio(folder2, tmp_path / "b.safetensors")
    assert not (tmp_path / "z.safetensors").exists() and not (tmp_path / "b.safetensors").exists()


def test_threshold_rule_by_hand() -> None:
    out = torch.tensor([[[[-2.0, 0.0, 3.0]]]])  # (1, 1, 1, 3) logits
    from segcore.normalise import Sigmoid

    scores = class_scores(out, OutputRule(rule="threshold", threshold=0.5, steps=(Sigmoid(),)))
    assert scores.shape == (1, 2, 1, 3)
    assert scores.argmax(dim=1).tolist() == [[[0, 0, 1]]]  # sigmoid 0.12, 0.5 (a tie: background), 0.95


def _zip(path: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in members:
            zf.writestr(info, data)
    return path


@pytest.mark.parametrize("name, why", [("../x.txt", "climbs out"), ("a/../../x.txt", "climbs out"),
                                       ("/tmp/abs-x.txt", "absolute"), ("C:\\x.txt", "absolute")])
def test_unsafe_members_are_refused_and_nothing_is_written(tmp_path: Path, name: str, why: str) -> None:
    archive = _zip(tmp_path / "bad.zip", [("rdf.yaml", b"type: model\n"), (name, b"owned")])
    target = tmp_path / "deep" / "target"
    with pytest.raises(UnsafeArchive, match=why):
        safe_extract_zip(archive, target)
    assert not target.exists() and not (tmp_path / "deep" / "x.txt").exists() and not (tmp_path / "x.txt").exists()
    with pytest.raises(UnsafeArchive):
        import_bioimageio(archive, tmp_path / "m.safetensors")


def test_symlink_members_are_refused(tmp_path: Path) -> None:
    link = zipfile.ZipInfo("weights.pt")
    link.external_attr = (0o120777 << 16)  # a symbolic link to /etc/passwd
    archive = _zip(tmp_path / "link.zip", [("rdf.yaml", b"type: model\n"), (link, b"/etc/passwd")])
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        safe_extract_zip(archive, tmp_path / "t")
    assert not (tmp_path / "t").exists()


class _Payload:
    """Unpickling this calls Path.write_text: a stand-in for arbitrary code in pickled weights."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "payload ran"))


def test_pickled_weights_with_a_payload_are_refused(trained: Path, tmp_path: Path) -> None:
    folder = _package_with(trained, tmp_path, Normalisation())
    marker = tmp_path / "marker.txt"
    torch.save({"head.weight": torch.zeros(1), "evil": _Payload(marker)}, folder / "weights.pt")
    _edit_rdf(folder, lambda rdf: rdf["weights"]["pytorch_state_dict"].__setitem__(
        "sha256", file_sha256(folder / "weights.pt")))  # the attacker controls the description too
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in folder.iterdir():
            zf.write(f, f.name)
    with pytest.raises(UnsafeWeights, match="weights_only=True"):
        import_bioimageio(archive, tmp_path / "evil.safetensors", weights="pytorch_state_dict")
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()
    # Control: the same file read the unsafe way runs the payload.
    torch.load(folder / "weights.pt", weights_only=False)
    assert marker.read_text() == "payload ran"
