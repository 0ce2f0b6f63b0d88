"""NIfTI export of volumes without a source header: the affine from the spacing, in a unit NIfTI
names (segcore.run.export)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segcore.run.export import _header_and_affine, nifti_units
from segcore.run.volumes import Volume

nib = pytest.importorskip("nibabel")


def test_spacing_units_become_nifti_units_converting_those_it_lacks() -> None:
    assert nifti_units("millimeter") == ("mm", 1.0) and nifti_units("micrometer") == ("micron", 1.0)
    assert nifti_units("nanometer") == ("micron", 1e-3) and nifti_units("centimeter") == ("mm", 10.0)
    assert nifti_units(None) == ("unknown", 1.0) and nifti_units("furlong") == ("unknown", 1.0)


def test_a_stack_without_an_affine_gets_its_spacing_in_its_unit() -> None:
    row = {"source_path": "/data/stack.ome.tif", "affine": None}
    volume = Volume(volume_id="stack", slices=("a",), spacing=(2000.0, 500.0, 250.0), unit="nanometer")
    header, affine, origin, unit = _header_and_affine(nib, row, volume, np.dtype(np.uint8))
    assert header is None and origin == "spacing" and unit == "micron"
    np.testing.assert_allclose(affine, np.diag([0.5, 0.25, 2.0, 1.0]))


def test_the_manifests_affine_keeps_its_recorded_unit() -> None:
    recorded = [[0.7, 0, 0, -10.0], [0, 0.7, 0, 5.0], [0, 0, 2.5, 1.0], [0, 0, 0, 1]]
    row = {"source_path": "/gone/ct.nii.gz", "affine": json.dumps(recorded)}
    volume = Volume(volume_id="ct", slices=("a",), spacing=(2.5, 0.7, 0.7), unit="millimeter")
    header, affine, origin, unit = _header_and_affine(nib, row, volume, np.dtype(np.uint8))
    assert header is None and origin == "manifest" and unit == "mm"
    np.testing.assert_array_equal(affine, np.asarray(recorded))
