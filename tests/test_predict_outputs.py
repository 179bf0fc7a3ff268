"""``glam3d predict`` outputs: one file per case named by its id, in the input's format (or ``--format``) with the
input's geometry exactly; nnU-Net channel files grouped into cases by the rule of ``glam3d.inference.cases``; the
largest-component postprocessing applied before writing."""
from __future__ import annotations

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch

from glam3d.cli import main
from glam3d.engine.checkpoint import load_checkpoint, save_checkpoint
from glam3d.errors import UserError
from glam3d.inference.cases import InputSpec, collect_cases
from glam3d.models import registry
from glam3d.postprocessing import apply_postprocessing
from glam3d.utils.ownership import MARKER

pipeline = pytest.importorskip("preprocessing.pipeline")
from preprocessing.imageio import sitk_affine  # noqa: E402

LABEL_VALUES = {1: 8, 2: 6, 3: 1}      # training index -> Synapse value: aorta, liver, spleen
HU = {1: 95.0, 2: 155.0, 3: 215.0}    # organ i at -125 + 400 * (0.4 + 0.15 i): the oracle reads it back


class Oracle(torch.nn.Module):
    """Reads the class off the (transunet-normalised) intensity of channel 0; with two channels, channel 1 masks
    it (foreground only where channel 1 is bright), so a label map shows that both files were read, in order."""
    num_classes, spatial_dims, default_crop = 4, 3, (16, 16, 16)

    def __init__(self, in_channels=1):
        super().__init__()
        self.in_channels = in_channels

    def forward(self, x):
        cls = torch.clamp(torch.round((x[:, 0] - 0.4) / 0.15), 0, 3).long()
        cls[x[:, 0] < 0.43] = 0
        if self.in_channels == 2:
            cls[x[:, 1] < 0.43] = 0
        return 10.0 * torch.nn.functional.one_hot(cls, 4).permute(0, 4, 1, 2, 3).float()


@pytest.fixture(autouse=True)
def _isolated_registry(monkeypatch):
    monkeypatch.setattr(registry, "_ensure_loaded", lambda: None)
    # the oracles are model families for these tests only (other tests list the registry)
    for name, ch in (("outoracle", 1), ("outoracle2", 2)):
        monkeypatch.setitem(registry._FAMILIES, name,
                            registry.Family(name, lambda ch=ch, **kw: Oracle(ch), {"base": {}}))


def checkpoint(path, spacing, channels=1, **extra):
    plan = pipeline.make_plan(spacing, {"scheme": "transunet"}, LABEL_VALUES, crop_to_body=False,
                              num_channels=channels)
    state = {"model_spec": {"name": "outoracle2_base" if channels == 2 else "outoracle_base", "kwargs": {}},
             "model": {}, "plan": plan, "labels": {"0": "background", "1": "aorta", "2": "liver", "3": "spleen"},
             "config": {"val": {"roi_size": [16, 16, 16], "overlap": 0.5}}, **extra}
    save_checkpoint(path, state)
    return path


def phantom(shape=(30, 26, 14), islands=False):
    """``(HU image, label values)`` of organs in a body; ``islands``: a stray voxel block of each organ too."""
    lab = np.zeros(shape, np.uint8)
    lab[4:12, 5:14, 3:10] = 2
    lab[17:25, 8:16, 4:11] = 3
    lab[13:16, 17:21, 1:13] = 1
    if islands:
        lab[26:28, 2:4, 1:3] = 2
        lab[2:4, 21:23, 11:13] = 3
    img = np.where(lab > 0, 0.0, 0.0).astype(np.float32)
    for i, hu in HU.items():
        img[lab == i] = hu
    raw = np.zeros_like(lab)
    for i, v in LABEL_VALUES.items():
        raw[lab == i] = v
    return img, raw


def _oblique(spacing=(1.5, 1.2, 2.5), origin=(12.5, -30.25, 7.75), deg=17.0):
    a = math.radians(deg)
    rot = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def write_sitk(path, arr_xyz, spacing, origin, direction):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_xyz.transpose(2, 1, 0)))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return path


def read_sitk(path):
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img).transpose(2, 1, 0), img


def _data(path):
    return np.asanyarray(nib.load(str(path)).dataobj)


# ------------------------------------------------------------------------------------------------ formats
@pytest.mark.parametrize("ending", [".mha", ".nrrd"])
def test_sitk_input_written_in_its_format_with_its_geometry(tmp_path, ending):
    """An .mha / .nrrd scan: the label map is ``<case><ending>`` with the input's origin, spacing and direction
    (the very numbers of its header), voxel for voxel the truth; --format nii.gz gives the same voxels in a NIfTI
    whose affine is the input's geometry in RAS."""
    img, raw = phantom()
    spacing, origin = (1.5, 1.2, 2.5), (12.5, -30.25, 7.75)
    c, s = math.cos(0.3), math.sin(0.3)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    scans = tmp_path / "scans"
    scans.mkdir()
    write_sitk(scans / f"ct_7{ending}", img.astype(np.int16), spacing, origin, direction)
    ck = checkpoint(tmp_path / "ck.pt", [2.5, 1.2, 1.5])
    assert main(["predict", "--checkpoint", str(ck), "--input", str(scans), "--output", str(tmp_path / "a"),
                 "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [MARKER, f"ct_7{ending}", "predictions.json"]
    got, out = read_sitk(tmp_path / "a" / f"ct_7{ending}")
    _, ref = read_sitk(scans / f"ct_7{ending}")
    assert out.GetOrigin() == ref.GetOrigin() and out.GetSpacing() == ref.GetSpacing()
    assert out.GetDirection() == ref.GetDirection()
    assert np.array_equal(got, raw)
    assert main(["predict", "--checkpoint", str(ck), "--input", str(scans / f"ct_7{ending}"), "--output",
                 str(tmp_path / "b"), "--quiet", "--format", "nii.gz", "--probabilities"]) == 0
    seg = nib.load(tmp_path / "b" / "ct_7.nii.gz")
    assert np.allclose(seg.affine, sitk_affine(spacing, origin, direction), atol=1e-9)
    assert np.array_equal(np.asanyarray(seg.dataobj), raw)
    assert nib.load(tmp_path / "b" / "ct_7_probabilities.nii.gz").shape == raw.shape + (4,)
    man = json.loads((tmp_path / "b" / "predictions.json").read_text())
    assert man["cases"]["ct_7"]["inference"]["format"] == ".nii.gz" and man["inference"]["format"] == ".nii.gz"


@pytest.mark.parametrize("fmt,ending", [("mha", ".mha"), ("nrrd", ".nrrd"), ("nii", ".nii")])
def test_nifti_input_written_in_another_format(tmp_path, fmt, ending):
    """An oblique NIfTI written as --format mha / nrrd / nii: read back (SimpleITK for the ITK formats), its
    affine is the input's (to 1e-9 mm) and its voxels the truth's; glam3d evaluate's reader agrees."""
    from glam3d.metrics.label_io import read_label_map

    img, raw = phantom()
    aff = _oblique()
    nib.save(nib.Nifti1Image(img.astype(np.int16), aff), tmp_path / "ct.nii.gz")
    ck = checkpoint(tmp_path / "ck.pt", [2.5, 1.2, 1.5])
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "ct.nii.gz"), "--output", str(out),
                 "--quiet", "--format", fmt, "--probabilities"]) == 0
    assert (out / f"ct_probabilities{'.nii' if fmt == 'nii' else '.nii.gz'}").is_file()
    labels, affine = read_label_map(out / f"ct{ending}")
    assert np.array_equal(labels, raw) and np.allclose(affine, aff, atol=1e-9)
    if fmt != "nii":
        got, sk = read_sitk(out / f"ct{ending}")
        assert np.array_equal(got, raw)
        assert np.allclose(sitk_affine(sk.GetSpacing(), sk.GetOrigin(), sk.GetDirection()), aff, atol=1e-9)
    else:
        assert np.allclose(nib.load(out / "ct.nii").affine, aff, atol=1e-9)


def test_unknown_format_or_one_that_loses_the_geometry_is_refused(tmp_path, capsys):
    """An unknown --format is refused; GIPL stores no direction: an oblique scan written as .gipl is refused in one
    line (nothing left behind), while a .gipl scan (identity direction) is written back as .gipl exactly."""
    from glam3d.inference.cases import output_format

    with pytest.raises(UserError, match=r"--format: 'png' is not a format glam3d writes"):
        output_format("png")
    assert output_format(".MHA") == ".mha" and output_format("input") is None
    img, raw = phantom()
    nib.save(nib.Nifti1Image(img.astype(np.int16), _oblique()), tmp_path / "ct.nii.gz")
    ck = checkpoint(tmp_path / "ck.pt", [2.5, 1.2, 1.5])
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "ct.nii.gz"), "--output", str(out),
                 "--quiet", "--format", "gipl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'ct.gipl'}: the .gipl format cannot hold this scan's geometry (its "
                          f"direction") and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == [MARKER]   # no label map, no temporary file
    write_sitk(tmp_path / "g.gipl", img.astype(np.int16), (1.5, 1.2, 2.5), (5.0, -7.0, 11.0), tuple(np.eye(3).ravel()))
    assert main(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "g.gipl"), "--output",
                 str(tmp_path / "g"), "--quiet"]) == 0
    got, sk = read_sitk(tmp_path / "g" / "g.gipl")
    ref = read_sitk(tmp_path / "g.gipl")[1]            # (GIPL stores float32 spacings: the header's own numbers)
    assert np.array_equal(got, raw) and sk.GetOrigin() == ref.GetOrigin() == (5.0, -7.0, 11.0)
    assert sk.GetSpacing() == ref.GetSpacing() and sk.GetDirection() == ref.GetDirection()


# ------------------------------------------------------------------------------------------------ grouping
def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), folder / n)
    return folder


@pytest.mark.parametrize("spec,files,want", [
    # nnU-Net v2: every file <case>_XXXX, grouped
    (InputSpec(1, "nnunet-v2"), ["amos_0001_0000.nii.gz", "amos_0002_0000.nii.gz"], {"amos_0001": 1, "amos_0002": 1}),
    (InputSpec(2, "nnunet-v2"), ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"],
     {"a": 2, "b": 2}),
    # MSD v1: one file a case, never cut at trailing digits
    (InputSpec(1, "msd"), ["amos_0001.nii.gz", "amos_0002.nii.gz"], {"amos_0001": 1, "amos_0002": 1}),
    (InputSpec(1, "msd"), ["amos_0000.nii.gz"], {"amos_0000": 1}),
    (InputSpec(2, "msd"), ["BRATS_001.nii.gz", "c_0000.nii.gz", "c_0001.nii.gz"], {"BRATS_001": 1, "c": 2}),
    # layout not recorded: nnU-Net's single-channel imagesTs (all _0000), else whole stems
    (InputSpec(1), ["x_0000.nii.gz", "y_0000.nii.gz"], {"x": 1, "y": 1}),
    (InputSpec(1), ["amos_0000.nii.gz", "amos_0001.nii.gz"], {"amos_0000": 1, "amos_0001": 1}),
    (InputSpec(1), ["img0001.nii.gz", "img0002.nii"], {"img0001": 1, "img0002": 1}),
    (InputSpec(2), ["a_0000.nii.gz", "a_0001.nii.gz", "z.nii.gz"], {"a": 2, "z": 1}),
])
def test_grouping_rule(tmp_path, spec, files, want):
    folder = _touch(tmp_path / "in", *files)
    cases = collect_cases([folder], spec)
    assert {c.name: len(c.files) for c in cases} == want
    for c in cases:
        assert [p.name for p in c.files] == sorted(p.name for p in c.files)   # channel order


def test_grouping_refusals_and_named_files(tmp_path):
    folder = _touch(tmp_path / "v2", "a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "c.nii.gz")
    with pytest.raises(UserError, match=r"c\.nii\.gz: not named <case>_XXXX\.nii\.gz"):
        collect_cases([folder], InputSpec(2, "nnunet-v2"))
    (folder / "c.nii.gz").unlink()
    with pytest.raises(UserError, match=r"case b: channel file b_0001\.nii\.gz is missing"):
        collect_cases([folder], InputSpec(2, "nnunet-v2"))
    _touch(folder, "b_0001.nii.gz", "b_0002.nii.gz")
    with pytest.raises(UserError, match=r"b_0002\.nii\.gz: case b: channel b_0002\.nii\.gz is one more"):
        collect_cases([folder], InputSpec(2, "nnunet-v2"))
    (folder / "b_0002.nii.gz").unlink()
    # one channel file named: its case, with the other channel files of its folder
    cases = collect_cases([folder / "a_0001.nii.gz"], InputSpec(2, "nnunet-v2"))
    assert [(c.name, [p.name for p in c.files]) for c in cases] == [("a", ["a_0000.nii.gz", "a_0001.nii.gz"])]
    # the folder and one of its files: one case
    assert [c.name for c in collect_cases([folder, folder / "b_0000.nii.gz"], InputSpec(2, "nnunet-v2"))] == \
        ["a", "b"]


def _layout_checkpoint(tmp_path, layout, channels=1):
    """A checkpoint whose config names a preprocessed dataset.json recording ``layout`` (what glam3d-preprocess
    writes for nnU-Net v2 / MSD datasets) and holding the checkpoint's plan."""
    ck = checkpoint(tmp_path / f"{layout}.pt", [2.5, 1.2, 1.5], channels)
    state = load_checkpoint(ck)
    pre = tmp_path / f"pre_{layout}"
    pre.mkdir()
    (pre / "dataset.json").write_text(json.dumps({"plan": state["plan"], "source_layout": layout,
                                                  "file_ending": ".nii.gz"}))
    state["config"]["data"] = {"root": str(pre)}
    save_checkpoint(ck, state)
    return ck


def test_nnunet_imagests_two_channels(tmp_path):
    """nnU-Net v2 imagesTs of a 2-channel dataset: ``case_0000`` + ``case_0001`` predicted as the case ``case``,
    written ``case.nii.gz`` (and ``case_probabilities.nii.gz``); channel 1 is read from the ``_0001`` file."""
    img, raw = phantom()
    aff = _oblique()
    ts = tmp_path / "imagesTs"
    ts.mkdir()
    mask = np.full(img.shape, -1000, np.int16)
    mask[:, :, 7:] = 400   # channel 1 bright in the upper half only: the oracle's foreground is masked by it
    for cid in ("liver_003", "liver_010"):
        nib.save(nib.Nifti1Image(img.astype(np.int16), aff), ts / f"{cid}_0000.nii.gz")
        nib.save(nib.Nifti1Image(mask, aff), ts / f"{cid}_0001.nii.gz")
    ck = _layout_checkpoint(tmp_path, "nnunet-v2", channels=2)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ck), "--input", str(ts), "--output", str(out), "--quiet",
                 "--probabilities"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [
        "liver_003.nii.gz", "liver_003_probabilities.nii.gz", "liver_010.nii.gz", "liver_010_probabilities.nii.gz"]
    want = np.where(mask > 0, raw, 0)
    assert np.array_equal(_data(out / "liver_003.nii.gz"), want) and want.any() and not np.array_equal(want, raw)
    man = json.loads((out / "predictions.json").read_text())
    assert man["cases"]["liver_010"]["inputs"] == [str(ts / "liver_010_0000.nii.gz"), str(ts / "liver_010_0001.nii.gz")]


@pytest.mark.parametrize("layout,files,outputs", [
    ("nnunet-v2", ["amos_0001_0000.nii.gz", "amos_0007_0000.nii.gz"], ["amos_0001.nii.gz", "amos_0007.nii.gz"]),
    ("msd", ["amos_0001.nii.gz", "amos_0007.nii.gz"], ["amos_0001.nii.gz", "amos_0007.nii.gz"]),
    ("msd", ["amos_0000.nii.gz"], ["amos_0000.nii.gz"]),
])
def test_single_channel_ids_ending_in_digits(tmp_path, layout, files, outputs):
    """A single-channel MSD ``imagesTs`` whose ids end in digits keeps them (``amos_0001`` is a case, not channel 1
    of ``amos``); nnU-Net v2's ``amos_0001_0000`` is the case ``amos_0001``. The layout is the one the checkpoint's
    preprocessed dataset.json recorded."""
    img, _ = phantom()
    ts = tmp_path / "imagesTs"
    ts.mkdir()
    for n in files:
        nib.save(nib.Nifti1Image(img.astype(np.int16), _oblique()), ts / n)
    ck = _layout_checkpoint(tmp_path, layout)
    out = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(ck), "--input", str(ts), "--output", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == outputs


# ------------------------------------------------------------------------------------------------ postprocessing
def _decision(classes, foreground=False, fg_classes=(8, 6, 1)):
    return {"format": "glam3d-postprocessing-v1",
            "foreground_largest_component": {"apply": foreground, "classes": list(fg_classes)},
            "classes_largest_component": list(classes)}


@pytest.mark.parametrize("fmt", ["nii.gz", "mha"])
def test_largest_component_before_writing(tmp_path, capsys, fmt):
    """--largest-component all / FILE.json: the written map is apply_postprocessing of the map written without
    it (in the scan's own geometry and label values, where the decision was made); recorded per case; a rerun
    with another postprocessing predicts again, the same one skips."""
    img, raw = phantom(islands=True)
    nib.save(nib.Nifti1Image(img.astype(np.int16), _oblique()), tmp_path / "ct.nii.gz")
    ck = checkpoint(tmp_path / "ck.pt", [2.5, 1.2, 1.5])
    ending = ".nii.gz" if fmt == "nii.gz" else ".mha"
    args = ["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "ct.nii.gz"), "--quiet", "--format", fmt]
    assert main(args + ["--output", str(tmp_path / "plain")]) == 0
    from glam3d.metrics.label_io import read_label_map

    plain = read_label_map(tmp_path / "plain" / f"ct{ending}")[0]
    assert np.array_equal(plain, raw)
    dec = tmp_path / "postprocessing.json"
    dec.write_text(json.dumps(_decision([6])))
    for pp, extra in (("all", ["--largest-component"]), (dec, ["--largest-component", str(dec)])):
        out = tmp_path / f"pp_{'all' if pp == 'all' else 'file'}"
        assert main(args + ["--output", str(out), *extra]) == 0
        got = read_label_map(out / f"ct{ending}")[0]
        want = apply_postprocessing(plain, "all" if pp == "all" else _decision([6]))
        assert np.array_equal(got, want) and not np.array_equal(got, plain)
        entry = json.loads((out / "predictions.json").read_text())["cases"]["ct"]
        if pp == "all":
            assert entry["inference"]["postprocessing"] == "all" and entry["postprocessing_source"] == "all"
            assert not (got[26:28, 2:4, 1:3]).any() and not (got[2:4, 21:23, 11:13]).any()
        else:
            assert entry["inference"]["postprocessing"] == {"foreground_largest_component": False,
                                                            "foreground_classes": [],
                                                            "classes_largest_component": [6]}
            assert entry["postprocessing_source"] == str(dec.resolve())
            assert not got[26:28, 2:4, 1:3].any() and (got[2:4, 21:23, 11:13] == 1).all()   # spleen's island kept
        assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [MARKER]   # no scratch file left
    capsys.readouterr()
    out = tmp_path / "pp_all"
    assert main(args + ["--output", str(out), "--largest-component"]) == 0
    assert "0 written, 1 skipped" in capsys.readouterr().out
    assert main(args + ["--output", str(out)]) == 0        # without it now: predicted again
    assert "1 written, 0 skipped" in capsys.readouterr().out
    assert np.array_equal(read_label_map(out / f"ct{ending}")[0], plain)


def test_predictor_largest_component_and_refusal(tmp_path):
    """``Predictor(largest_component=...)``: ``predict`` returns what the command writes; a decision naming a label
    value the checkpoint never writes is refused in one line naming the file."""
    from glam3d import Predictor

    img, _ = phantom(islands=True)
    nib.save(nib.Nifti1Image(img.astype(np.int16), _oblique()), tmp_path / "ct.nii.gz")
    ck = checkpoint(tmp_path / "ck.pt", [2.5, 1.2, 1.5])
    assert main(["predict", "--checkpoint", str(ck), "--input", str(tmp_path / "ct.nii.gz"), "--quiet", "--output",
                 str(tmp_path / "out"), "--largest-component", "all"]) == 0
    seg = Predictor.from_checkpoint(ck, device="cpu", largest_component="all").predict(tmp_path / "ct.nii.gz")
    assert np.array_equal(np.asanyarray(seg.dataobj), _data(tmp_path / "out" / "ct.nii.gz"))
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(_decision([6, 99])))
    with pytest.raises(UserError, match=r"other\.json: the postprocessing decision names label value 99"):
        Predictor.from_checkpoint(ck, device="cpu", largest_component=bad)


def test_label_volume_is_mapped_and_leaves_nothing(tmp_path):
    """The assembled label map lives in an unlinked file of the scratch folder (mapped), and equals the slabs."""
    from glam3d.inference.outputs import LabelVolume

    rng = np.random.default_rng(0)
    vol = rng.integers(0, 9, (13, 11, 17)).astype(np.uint8)
    lv = LabelVolume(vol.shape, np.uint8, tmp_path)
    assert lv.mapped and list(tmp_path.iterdir()) == []
    lv.fill(vol[:, :, z:z + 4] for z in range(0, 17, 4))
    assert np.array_equal(lv.array, vol) and lv.array.T.flags["C_CONTIGUOUS"]
    assert np.array_equal(np.concatenate(list(lv.slabs(3)), axis=2), vol)
    assert lv.values() == set(np.unique(vol).tolist())
    assert not LabelVolume(vol.shape, np.uint8, None).mapped
    with pytest.raises(ValueError, match="cover 8 of 17 planes"):
        LabelVolume(vol.shape, np.uint8).fill([vol[:, :, :8]], "x")


# ------------------------------------------------------------------------------------------------ slab-wise cleaning
_DECISIONS = [
    "all",
    _decision([2], foreground=True, fg_classes=(1, 2, 3)),
    _decision([1, 3], foreground=True, fg_classes=(1, 3)),
    {"format": "glam3d-postprocessing-v1", "foreground_largest_component": {"apply": True},
     "classes_largest_component": []},
    _decision([3]),
]


@pytest.mark.parametrize("seed", range(6))
def test_slabwise_cleaning_equals_apply_postprocessing(seed):
    """apply_in_slabs (what predict writes with) gives apply_postprocessing's map voxel for voxel, ties included,
    whatever the slab thickness: random maps of many small components (ties of equal sizes are frequent)."""
    from glam3d.inference.components import apply_in_slabs

    rng = np.random.default_rng(seed)
    for _ in range(12):
        shape = tuple(int(v) for v in rng.integers(3, 12, 3))
        a = ((rng.random(shape) < rng.random() * 0.6) * rng.integers(1, 4, shape)).astype(np.uint8)
        for d in _DECISIONS:
            ref = apply_postprocessing(a, d)
            for planes in (1, 2, 3, 64):
                got = apply_in_slabs(np.asfortranarray(a.copy()), d, planes=planes)
                assert np.array_equal(got, ref), (shape, d, planes)


def test_slabwise_cleaning_labels_one_slab_at_a_time(monkeypatch):
    """On a long map where a stray island stretches an organ's bounding box over the whole scan (what makes the
    whole-map cleaning's work arrays as large as the scan), every array labelled is one slab of planes; the
    result is apply_postprocessing's."""
    from glam3d.inference import components

    lab = np.zeros((40, 30, 300), np.uint8)
    lab[5:25, 5:20, 10:60] = 6        # the organ
    lab[30:33, 25:28, 280:284] = 6    # its island, 220 planes away
    lab[10:12, 10:12, 100:290] = 8    # a vessel running along the scan, one component across many slabs
    lab[20:22, 10:12, 100:150] = 8    # a second vessel piece, smaller
    lab[2, 2, 0] = 1
    lab[37, 27, 299] = 1             # two one-voxel spleens: a tie, the first in C order is kept
    ref = apply_postprocessing(lab, "all")
    shapes, real = [], components.ndimage.label
    monkeypatch.setattr(components.ndimage, "label", lambda m, **k: (shapes.append(m.shape), real(m, **k))[1])
    got = components.apply_in_slabs(np.asfortranarray(lab.copy()), "all", planes=16)
    assert np.array_equal(got, ref)
    assert got[30:33, 25:28, 280:284].sum() == 0 and got[20:22, 10:12, 100:150].sum() == 0
    assert got[2, 2, 0] == 1 and got[37, 27, 299] == 0
    assert shapes and max(s[2] for s in shapes) == 16
