"""preprocessing.imageio: one reader for NIfTI and every SimpleITK format, with the geometry nibabel would give.

The reference for the affine is nibabel itself: the same voxels and affine are written by nibabel as .nii.gz, then
converted by SimpleITK's own NIfTI reader to .mha / .nrrd; reading those back through SimpleITK (LPS) must give
nibabel's RAS affine and the same voxels.
"""
from __future__ import annotations

import math
import os

import nibabel as nib
import numpy as np
import pytest

from glam3d.errors import UserError
from preprocessing import imageio as io
from preprocessing.pipeline import make_plan, preprocess_scan


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = (math.cos(ax), math.sin(ax), math.cos(ay), math.sin(ay), math.cos(az), math.sin(az))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


AFFINES = {
    "RAS": np.diag([0.8, 0.9, 2.5, 1.0]) + np.array([[0, 0, 0, -40.0], [0, 0, 0, 12.0], [0, 0, 0, 7.5], [0] * 4]),
    "LPS": np.diag([-0.7, -0.7, 3.0, 1.0]) + np.array([[0, 0, 0, 90.0], [0, 0, 0, 80.0], [0, 0, 0, -20], [0] * 4]),
    "oblique": np.vstack([np.hstack([_rotation(0.2, -0.15, 0.4) @ np.diag([1.1, 0.9, 2.0]),
                                     np.array([[-10.0], [5.0], [33.0]])]), [0, 0, 0, 1]]),
    "permuted": np.array([[0, 0, -2.0, 50], [1.2, 0, 0, -30], [0, -1.2, 0, 20], [0, 0, 0, 1]]),
}


def _nifti(path, data, affine):
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.to_filename(str(path))
    return path


def _via_sitk(nii, out):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(nii)), str(out))
    return out


@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
@pytest.mark.parametrize("orientation", list(AFFINES))
def test_sitk_formats_match_nibabel(tmp_path, ending, orientation):
    rng = np.random.default_rng(3)
    data = rng.integers(-1000, 1500, (11, 9, 7)).astype(np.int16)
    nii = _nifti(tmp_path / "x.nii.gz", data, AFFINES[orientation])
    ref = nib.load(str(nii))
    other = io.load_image(_via_sitk(nii, tmp_path / f"x{ending}"))
    np.testing.assert_allclose(other.affine, ref.affine, atol=1e-4)
    got = np.asanyarray(other.dataobj)
    assert got.dtype == np.int16 and got.shape == data.shape
    np.testing.assert_array_equal(got, data)
    assert other.get_filename() == str(tmp_path / f"x{ending}")
    assert nib.aff2axcodes(other.affine) == nib.aff2axcodes(ref.affine)
    shape, affine = io.read_header(tmp_path / f"x{ending}")           # header only: the same geometry
    assert shape == data.shape
    np.testing.assert_allclose(affine, ref.affine, atol=1e-4)


def test_sitk_scan_preprocesses_like_the_nifti(tmp_path):
    """The pipeline gives the same array and meta for one scan stored as .nii.gz and as .mha."""
    rng = np.random.default_rng(4)
    data = np.full((20, 18, 10), -1000, np.int16)
    data[3:17, 2:16, :] = rng.integers(-100, 300, (14, 14, 10))
    nii = _nifti(tmp_path / "ct.nii.gz", data, AFFINES["oblique"])
    mha = _via_sitk(nii, tmp_path / "ct.mha")
    plan = make_plan([2.0, 1.5, 1.5], {"scheme": "transunet"}, {"1": 1})
    a, ma = preprocess_scan(io.load_image(nii), plan)
    b, mb = preprocess_scan(io.load_image(mha), plan)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert set(ma) == set(mb)
    for k in ma:
        if k in ("original_affine", "spacing", "resampled_spacing"):   # float32 geometry in the .mha header
            np.testing.assert_allclose(ma[k], mb[k], atol=1e-4)
        elif k != "source_image":
            assert ma[k] == mb[k], k


def test_load_channels_stacks_and_checks_geometry(tmp_path):
    aff = AFFINES["LPS"]
    c0 = _nifti(tmp_path / "c_0000.nii.gz", np.ones((6, 5, 4), np.int16), aff)
    c1 = _nifti(tmp_path / "c_0001.nii.gz", np.full((6, 5, 4), 2.5, np.float32), aff)
    img = io.load_channels([c0, c1])
    assert img.shape == (6, 5, 4, 2) and img.get_filename() == str(c0)
    d = np.asanyarray(img.dataobj)
    assert np.all(d[..., 0] == 1) and np.all(d[..., 1] == 2.5)
    moved = aff.copy()
    moved[0, 3] += 4
    bad = _nifti(tmp_path / "c_0002.nii.gz", np.ones((6, 5, 4), np.int16), moved)
    with pytest.raises(UserError, match="affine differs") as e:
        io.load_channels([c0, bad])
    assert str(bad) in str(e.value)
    assert io.load_channels([c0]).dataobj is not None        # one file: the lazy nibabel image itself


def _nan_affine_nifti(path, shape=(4, 5, 6)):
    """nibabel will not make an image of a NaN affine: the header's sform rows are written directly."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.int16)
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = [np.nan, 0, 0, 0], [0, 2, 0, 0], [0, 0, 3, 0]
    hdr["pixdim"][1:4] = [2, 2, 3]
    nib.Nifti1Image(np.zeros(shape, np.int16), None, header=hdr).to_filename(str(path))
    return path


def test_bad_geometry_and_voxel_types_refused(tmp_path):
    deg = np.diag([2.0, 2.0, 3.0, 1.0])
    deg[:3, 1] = [2.0, 0.0, 0.0]                      # the second voxel axis is the first one again: rank 2
    p = tmp_path / "deg.nii.gz"
    nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), deg).to_filename(str(p))
    with pytest.raises(UserError, match="degenerate") as e:
        io.load_image(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"non-finite \(NaN/inf\) affine"):
        io.load_image(_nan_affine_nifti(tmp_path / "nan.nii.gz"))
    sheared = np.diag([2.0, 2.0, 3.0, 1.0])
    sheared[0, 2] = 1.5                               # a gantry tilt: sheared but independent axes, accepted
    q = tmp_path / "tilt.nii.gz"
    nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), sheared).to_filename(str(q))
    assert io.load_image(q).shape == (4, 5, 6)
    c = tmp_path / "complex.nii.gz"
    nib.Nifti1Image(np.zeros((4, 5, 6), np.complex64), np.eye(4)).to_filename(str(c))
    with pytest.raises(UserError, match="complex voxel type"):
        io.load_image(c)
    import SimpleITK as sitk

    n = tmp_path / "complex.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.complex64)), str(n))
    with pytest.raises(UserError, match="complex voxel type") as e:
        io.load_image(n)
    assert str(n) in str(e.value)


def test_links_and_missing_files_named(tmp_path):
    loop = tmp_path / "loop.nii.gz"
    os.symlink(loop, loop)
    with pytest.raises(UserError, match="symbolic-link loop") as e:
        io.load_image(loop)
    assert str(loop) in str(e.value)
    broken = tmp_path / "broken.mha"
    os.symlink(tmp_path / "nowhere.mha", broken)
    with pytest.raises(UserError, match="broken symbolic link"):
        io.load_image(broken)
    with pytest.raises(UserError, match="file not found"):
        io.load_image(tmp_path / "missing.nrrd")
    (tmp_path / "dir.nii.gz").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        io.load_image(tmp_path / "dir.nii.gz")
    junk = tmp_path / "junk.mha"
    junk.write_bytes(b"not an image at all\n" * 10)
    with pytest.raises(UserError, match="not an image SimpleITK can read") as e:
        io.load_image(junk)
    assert "\n" not in str(e.value)


def test_strip_ending():
    assert io.strip_ending("amos_0001_0000.nii.gz") == "amos_0001_0000"
    assert io.strip_ending("a.NRRD") == "a" and io.strip_ending("b.mha") == "b" and io.strip_ending("c.txt") == "c.txt"
