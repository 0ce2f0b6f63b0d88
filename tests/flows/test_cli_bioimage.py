"""``segflow model export --to bioimageio`` and ``segflow model import PACKAGE`` through the real CLI."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bioimageio.core")

from flows.cli import main  # noqa: E402
from segcore.models import create_model  # noqa: E402
from segcore.models.checkpoint import ModelMeta, read_meta, save_checkpoint  # noqa: E402
from segcore.normalise import Normalisation  # noqa: E402


def test_export_then_import_a_bioimageio_package(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    net = create_model("unet", in_channels=1, num_classes=2, base=4, depth=2).eval()
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("background", "cell"),
                     in_channels=1, normalisation=Normalisation(mode="range", scale=255.0))
    ckpt = save_checkpoint(tmp_path / "unet.safetensors", net, meta)
    assert main(["model", "export", str(ckpt), "--to", "bioimageio", "--out", str(tmp_path / "p.zip")]) == 2
    assert "--author" in capsys.readouterr().err
    assert main(["model", "export", str(ckpt), "--to", "bioimageio", "--out", str(tmp_path / "p.zip"),
                 "--author", "Jane Doe"]) == 0
    assert "model test passed" in capsys.readouterr().out
    assert main(["model", "import", str(tmp_path / "p.zip"), "--out", str(tmp_path / "back.safetensors")]) == 0
    back = read_meta(tmp_path / "back.safetensors")
    assert back.normalisation == meta.normalisation and back.class_names == meta.class_names
    assert back.source["format"] == "bioimageio:pytorch_state_dict"
    # where the record cannot go, told once the weights are chosen, before they are read; nothing written
    for out, says in ((tmp_path / "back.segflow", "names a directory record; a torch checkpoint is a file"),
                      (tmp_path / "p.zip" / "x.safetensors", "is a file, so nothing can be made under it")):
        assert main(["model", "import", str(tmp_path / "p.zip"), "--out", str(out)]) == 2
        assert says in capsys.readouterr().err and not out.exists()
    assert main(["model", "import", str(tmp_path / "p.zip"), "--out", str(tmp_path / "back.safetensors")]) == 2
    assert "exists; give a new --out, or pass --overwrite" in capsys.readouterr().err
