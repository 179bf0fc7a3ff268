"""Streamed NIfTI writing (glam3d.utils.nifti) and the scratch-file probability target of glam3d predict."""
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from glam3d.inference.sliding_window import predict_volume
from glam3d.utils.ooc import ScratchArray
from glam3d.utils.nifti import nifti_header, write_nifti_streamed, write_volumes


def _affine():
    a = np.diag([0.8, 0.7, 2.5, 1.0])
    a[:3, 3] = [-10.0, 4.0, 30.0]
    a[0, 1] = 0.05  # oblique
    return a


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_streamed_4d_float32_equals_nibabel(tmp_path, suffix):
    rng = np.random.default_rng(0)
    # class maps as the restore gives them: transposed / flipped views of (D, H, W) arrays
    maps = [rng.random((7, 6, 5), dtype=np.float32).transpose(2, 1, 0)[::-1] for _ in range(3)]
    ref = nib.Nifti1Image(np.stack(maps, -1), _affine())
    ref.set_qform(_affine(), code=1)
    ref.set_sform(_affine(), code=1)
    nib.save(ref, tmp_path / f"ref{suffix}")
    hdr = nifti_header((5, 6, 7, 3), np.float32, _affine())
    n = write_nifti_streamed(tmp_path / f"new{suffix}", hdr,
                             (m[:, :, z:z + 2].tobytes(order="F") for m in maps for z in range(0, 7, 2)))
    assert n == 5 * 6 * 7 * 3 * 4
    a, b = nib.load(tmp_path / f"ref{suffix}"), nib.load(tmp_path / f"new{suffix}")
    assert a.shape == b.shape == (5, 6, 7, 3) and b.get_data_dtype() == np.float32
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
    assert np.allclose(b.affine, _affine())
    assert np.allclose(b.get_qform(), a.get_qform(), atol=1e-6)  # (a sheared affine's nearest rigid qform)


def test_streamed_int16_planes_and_wrong_sizes(tmp_path):
    vol = np.arange(4 * 3 * 5, dtype=np.int16).reshape(4, 3, 5)  # (X, Y, Z)
    hdr = nifti_header(vol.shape, np.int16, np.eye(4))
    for name in ("v.nii.gz", "w.nii.gz"):
        write_nifti_streamed(tmp_path / name, hdr, (vol[:, :, z].tobytes(order="F") for z in range(5)))
    assert np.array_equal(np.asarray(nib.load(tmp_path / "v.nii.gz").dataobj), vol)
    raw = (tmp_path / "v.nii.gz").read_bytes()
    assert raw == (tmp_path / "w.nii.gz").read_bytes()  # no name, no time stamp in the gzip header: same bytes
    assert raw[3] & 0x08 == 0 and raw[4:8] == b"\0\0\0\0"  # FNAME flag clear, MTIME 0
    with pytest.raises(ValueError, match=r"short\.nii.*bytes of voxels"):
        write_nifti_streamed(tmp_path / "short.nii", hdr, [vol[:, :, :4].tobytes(order="F")])
    with pytest.raises(ValueError, match=r"long\.nii.*bytes of voxels"):
        write_nifti_streamed(tmp_path / "long.nii", hdr, [b"\0" * (vol.nbytes + 2)])


def test_write_volumes_checks_the_slabs(tmp_path):
    rng = np.random.default_rng(2)
    maps = rng.random((2, 2, 3, 4), dtype=np.float32)
    # class 0 in two slabs, class 1 in one
    write_volumes(tmp_path / "p.nii.gz", iter([[maps[0][:, :, :1], maps[0][:, :, 1:]], [maps[1]]]), 2,
                  (2, 3, 4), np.eye(4), np.float32, intent="class probabilities")
    img = nib.load(tmp_path / "p.nii.gz")
    assert img.shape == (2, 3, 4, 2) and img.header.get_intent()[0] == "vector"
    assert np.array_equal(np.moveaxis(np.asarray(img.dataobj), -1, 0), maps)
    # one volume: a 3D image, cast to the dtype asked for
    lab = (maps[0] * 10).astype(np.int16)
    write_volumes(tmp_path / "l.nii.gz", [[lab[:, :, :3], lab[:, :, 3:]]], None, (2, 3, 4), np.eye(4), np.int16)
    img = nib.load(tmp_path / "l.nii.gz")
    assert img.shape == (2, 3, 4) and img.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(img.dataobj), lab)
    for bad in ([[maps[0]], [maps[1][:, :, :3]]],                    # a short class map
                [[maps[0]], [np.zeros((2, 3, 5), np.float32)]],     # a long one
                [[maps[0]], [np.zeros((3, 3, 4), np.float32)]],     # another grid
                [[maps[0]]],                                         # a class missing
                [[maps[0]], [maps[1]], [maps[1]]]):                  # one too many
        with pytest.raises(ValueError, match=r"q\.nii\.gz"):
            write_volumes(tmp_path / "q.nii.gz", iter(bad), 2, (2, 3, 4), np.eye(4), np.float32)


def test_scratch_array_equals_memory_and_leaves_nothing(tmp_path):
    shape = (3, 10, 12, 14)
    target = ScratchArray(tmp_path, shape)
    assert os.listdir(tmp_path) == []  # unlinked as soon as it was mapped
    ref = np.zeros(shape, np.float32)
    rng = np.random.default_rng(1)
    for d0, h0, w0 in [(0, 0, 0), (5, 0, 7), (0, 6, 0), (5, 6, 7), (2, 3, 4)]:
        v = rng.random((3, 5, 6, 7), dtype=np.float32)
        key = (slice(None), slice(d0, d0 + 5), slice(h0, h0 + 6), slice(w0, w0 + 7))
        target[key] = v
        ref[key] = v
    target[1, 0] = 7.0  # any other key
    ref[1, 0] = 7.0
    assert np.array_equal(np.asarray(target), ref)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_scratch_array_releases_its_pages(tmp_path):
    def rss_file():  # resident pages of file mappings (RssShmem where the folder is a tmpfs), bytes
        with open("/proc/self/status") as f:
            return 1024 * sum(int(line.split()[1]) for line in f if line.startswith(("RssFile:", "RssShmem:")))
    shape = (4, 128, 256, 256)  # 128 MB
    target = ScratchArray(tmp_path, shape)
    before, grown = rss_file(), 0
    for d0 in range(0, 128, 8):  # cells a quarter of the width: pages are touched for parts of rows
        for w0 in range(0, 256, 64):
            target[(slice(None), slice(d0, d0 + 8), slice(None), slice(w0, w0 + 64))] = np.ones((4, 8, 256, 64),
                                                                                                np.float32)
            grown = max(grown, rss_file() - before)
    assert grown < (48 << 20), grown  # at most one release interval (32 MB) resident, not the 128 MB written
    assert float(np.asarray(target)[:, ::7, ::5, ::3].min()) == 1.0  # and nothing was lost


def test_predict_volume_probs_out_gets_the_same_probabilities(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    x = torch.randn(1, 20, 18, 22)
    kw = dict(roi_size=(8, 8, 8), overlap=0.5, sw_batch_size=2, return_probs=True, device="cpu")
    labels, probs = predict_volume(net, x, **kw)
    made = []

    def target(shape):
        made.append(ScratchArray(tmp_path, shape))
        return made[-1]
    labels2, probs2 = predict_volume(net, x, probs_out=target, **kw)
    assert len(made) == 1 and probs2 is made[0] and made[0].shape == (3, 20, 18, 22)
    assert torch.equal(labels, labels2)
    assert np.array_equal(np.asarray(probs2), probs.numpy())
