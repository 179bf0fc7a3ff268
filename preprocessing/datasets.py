"""Raw dataset layouts (BTCV/Synapse here; nnU-Net v2 / MSD in :mod:`preprocessing.raw_dataset`), reading and checking
cases, and the resumable multi-case run."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from glam3d.errors import UserError

from .imageio import NIFTI_ENDINGS, check_geometry, load_channels, load_image, read_header, strip_ending
from .phantom import BTCV_LABELS
from .raw_dataset import Case, discover, label_map, list_images, load_json

# ----------------------------------------------------------------------------------------------- Synapse protocol
SYNAPSE_TEST = ["0001", "0002", "0003", "0004", "0008", "0022", "0025", "0029", "0032", "0035", "0036", "0038"]
SYNAPSE_TRAIN = ["0005", "0006", "0007", "0009", "0010", "0021", "0023", "0024", "0026", "0027", "0028", "0030",
                 "0031", "0033", "0034", "0037", "0039", "0040"]
# training index -> (BTCV label value, name), in the order papers print the organs
SYNAPSE_ORGANS = [(8, "aorta"), (4, "gallbladder"), (3, "left kidney"), (2, "right kidney"), (6, "liver"),
                  (11, "pancreas"), (1, "spleen"), (7, "stomach")]


def synapse_labels(keep_all: bool):
    """``(labels {"0": "background", ...}, label_values {index: original value})``."""
    if keep_all:
        items = [(v, BTCV_LABELS[v]) for v in range(1, 14)]
    else:
        items = SYNAPSE_ORGANS
    labels = {"0": "background"}
    values = {}
    for i, (v, name) in enumerate(items, start=1):
        labels[str(i)] = name
        values[i] = v
    return labels, values


def _nii_files(folder: Path):
    return list_images(folder, NIFTI_ENDINGS)


def _strip(name: str) -> str:
    return strip_ending(name, NIFTI_ENDINGS)


def find_btcv_root(raw: Path) -> Path:
    raw = Path(raw)
    if not raw.is_dir():
        raise UserError("is not a folder", raw)
    for cand in (raw, raw / "RawData" / "Training", raw / "Training", raw / "RawData"):
        if (cand / "img").is_dir():
            return cand
    raise UserError("no img/ folder found (expected DIR/img and DIR/label, or DIR/RawData/Training/img)", raw)


def discover_synapse(raw: Path, unlisted: str = "error"):
    """Cases of a BTCV folder with the Synapse split; returns ``(root, cases, warnings)``."""
    root = find_btcv_root(raw)
    imgs = _nii_files(root / "img")
    labs = {}
    for p in _nii_files(root / "label"):
        m = re.search(r"(\d+)$", _strip(p.name))
        if m:
            labs[m.group(1).zfill(4)] = p
    if not imgs:
        raise UserError("no NIfTI images (*.nii.gz) found", root / "img")
    cases, warnings, seen = [], [], set()
    for p in imgs:
        m = re.search(r"(\d+)$", _strip(p.name))
        if not m:
            warnings.append(f"{p}: cannot read a case number from the name (expected img00XX.nii.gz); ignored")
            continue
        cid = m.group(1).zfill(4)
        seen.add(cid)
        lab = labs.get(cid)
        if cid in SYNAPSE_TRAIN:
            split, err = "training", None
        elif cid in SYNAPSE_TEST:
            split, err = "test", None
        elif unlisted == "skip":
            warnings.append(f"{p}: case {cid} is in neither Synapse list; skipped (--unlisted skip)")
            continue
        elif unlisted in ("train", "test"):
            split, err = ("training" if unlisted == "train" else "test"), None
        else:
            split, err = "training", (f"case {cid} is in neither the Synapse train (18) nor test (12) list; "
                                      f"use --unlisted skip|train|test to include or skip such cases")
        if lab is None and err is None:
            err = f"no label file (expected {root / 'label' / ('label' + cid + '.nii.gz')})"
        cases.append(Case(cid, [p], lab, split, error=err and f"{p}: {err}"))
    for cid, p in sorted(labs.items()):
        if cid not in seen:
            warnings.append(f"{p}: label without an image; ignored")
    return root, cases, warnings


# ----------------------------------------------------------------------------------------------- MSD / nnU-Net
def read_msd_json(ds: Path) -> dict:
    """``DS/dataset.json`` as a dict (a JSON object with ``labels``); see :func:`raw_dataset.read_dataset_json` for
    the full check."""
    path = Path(ds) / "dataset.json"
    meta = load_json(path)
    if "labels" not in meta:
        raise UserError("has no 'labels' entry", path)
    return meta


def msd_label_map(meta: dict, path) -> dict:
    """``{value: name}`` from MSD (``{"0": "background"}``) or nnU-Net v2 (``{"background": 0}``) labels."""
    return label_map(meta, path)


def discover_msd(ds: Path):
    """``(dataset.json dict, cases, warnings)`` of an nnU-Net v2 / MSD folder (:func:`raw_dataset.discover`)."""
    raw, cases, warnings = discover(ds)
    return raw.meta, cases, warnings


# ----------------------------------------------------------------------------------------------- reading and checks
def load_nifti(path: Path):
    """The image at ``path`` (NIfTI or any format SimpleITK reads), checked: :func:`imageio.load_image`."""
    return load_image(path)


def read_image(case: Case, allow_channels: bool):
    """``(image, voxels (X, Y, Z, C) float32)`` of a case: its channel files stacked (they must share their
    geometry), or one file (4D when ``allow_channels``). A case listing its declared channel count
    (``case.extra["channels"]``, from dataset.json) must have that many."""
    from .pipeline import read_voxels

    img = load_channels(case.images)
    data = read_voxels(img, case.images[0], allow_channels=allow_channels or len(case.images) > 1)
    want = case.extra.get("channels")
    if want is not None and data.shape[3] != want:
        fld = case.extra.get("channel_field", "modality")
        raise UserError(f"has {data.shape[3]} channel(s) but dataset.json field {fld!r} declares {want}",
                        case.images[0])
    return img, data


def read_label(path: Path, image, image_path, declared) -> np.ndarray:
    """Label voxels (X, Y, Z), integers, checked against the image geometry and the declared label values.

    Integer maps keep their stored dtype (uint8 for most); float-stored maps must hold whole numbers and become
    the smallest of int16 / int32 that holds them. Checks and conversions run slab by slab along Z (no
    whole-volume temporaries: a 512×512×1,000 uint8 map is 0.26 GB, int32 + a sorted copy were 2 GB)."""
    lab_img = load_image(path)
    if len(lab_img.shape) > 3 and not all(s == 1 for s in lab_img.shape[3:]):
        raise UserError(f"expected a 3D label map, got shape {lab_img.shape}", path)
    check_geometry(image, lab_img, image_path, path)
    from .pipeline import _read_stored, stored_unscaled_integers, z_slabs

    try:
        raw = _read_stored(lab_img) if stored_unscaled_integers(lab_img) else np.asarray(lab_img.dataobj)
    except Exception as exc:
        raise UserError(f"cannot read the voxel data ({type(exc).__name__}: {exc})", path) from None
    raw = raw.reshape(raw.shape[:3])
    zs = z_slabs(raw.shape, raw.itemsize)
    values: set = set()
    for z0, z1 in zs:
        part = raw[:, :, z0:z1]
        if raw.dtype.kind == "f":
            if not np.isfinite(part).all():
                raise UserError("label map contains NaN/inf", path)
            if not np.array_equal(np.rint(part), part):
                raise UserError("label map has non-integer values", path)
        values.update(np.unique(part).tolist())
    bad = sorted(set(int(v) for v in values) - set(declared))
    if bad:
        shown = ", ".join(str(v) for v in bad[:8]) + (" ..." if len(bad) > 8 else "")
        raise UserError(f"label values {shown} are not in the declared set "
                        f"{min(declared)}..{max(declared)}", path)
    if raw.dtype.kind in "iu":
        return raw
    dtype = np.int16 if all(-32768 <= v <= 32767 for v in values) else np.int32
    lab = np.empty(raw.shape, dtype=dtype)
    for z0, z1 in zs:
        lab[:, :, z0:z1] = raw[:, :, z0:z1]
    return lab


# ----------------------------------------------------------------------------------------------- statistics
def _fingerprint(paths) -> str:
    h = hashlib.sha1()
    for p in paths:
        p = Path(p)
        try:
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()


def median_spacing(cases, orientation: str):
    """Median (sz, sy, sx) over the training cases' headers (all cases if none is readable), after reorientation."""
    import nibabel as nib

    from .imageio import check_affine
    from .pipeline import check_spacing, voxel_sizes

    def spacings(selected):
        out = []
        for c in selected:
            try:
                shape, affine = read_header(c.images[0])
                check_affine(affine)
                tr, _ = _orient(affine, orientation)
                aff = np.asarray(affine) @ nib.orientations.inv_ornt_aff(tr, shape[:3])
                sp = voxel_sizes(aff)[::-1]
                check_spacing(sp)  # a case with an absurd header must not skew the others' target spacing
                out.append(sp)
            except Exception:
                continue
        return out

    sps = spacings([c for c in cases if not c.error and c.split == "training"]) or spacings(cases)
    if not sps:
        raise UserError("no readable image to compute the median spacing from; give --spacing")
    return [float(v) for v in np.median(np.array(sps), axis=0)]


def _orient(affine, orientation):
    from .pipeline import _orientation_transform

    return _orientation_transform(affine, orientation)


def foreground_intensity_stats(cases, declared, out: Path, nch: int, allow_channels: bool, log=print):
    """nnU-Net CT statistics over the training cases' foreground (label > 0): per channel 0.5/99.5 percentiles,
    mean and std (10,000 sampled voxels per case). Cached in ``OUT/.cache/intensity_stats.json``."""
    train = [c for c in cases if c.split == "training" and c.label is not None and not c.error]
    files = [p for c in train for p in c.images] + [c.label for c in train]
    key = _fingerprint(files)
    cache = out / ".cache" / "intensity_stats.json"
    if cache.is_file():
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == key and len(cached["channels"]) == nch:
                return cached["channels"]
        except Exception:
            pass
    rng = np.random.default_rng(0)
    samples = [[] for _ in range(nch)]
    used = 0
    for c in train:
        try:
            img, data = read_image(c, allow_channels)
            lab = read_label(c.label, img, c.images[0], declared)
        except UserError:
            continue   # reported when the case itself is processed
        fg = lab > 0
        if not fg.any() or data.shape[3] != nch:
            continue
        for ch in range(nch):
            v = data[..., ch][fg]
            samples[ch].append(rng.choice(v, size=min(10000, v.size), replace=False))
        used += 1
    if not used:
        raise UserError("--intensity nnunet needs at least one readable training case with foreground labels")
    chans = []
    for ch in range(nch):
        v = np.concatenate(samples[ch]).astype(np.float64)
        chans.append({"lower": float(np.percentile(v, 0.5)), "upper": float(np.percentile(v, 99.5)),
                      "mean": float(v.mean()), "std": float(v.std()), "num_cases": used})
    from glam3d.utils.io import atomic_write_json

    atomic_write_json(cache, {"key": key, "channels": chans})
    log(f"intensity statistics over {used} training cases' foreground: "
        + "; ".join(f"ch{i} [{c['lower']:.1f}, {c['upper']:.1f}] mean {c['mean']:.1f} std {c['std']:.1f}"
                    for i, c in enumerate(chans)))
    return chans


# ----------------------------------------------------------------------------------------------- one case
def plan_hash(plan: dict) -> str:
    return hashlib.sha1(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def case_output(out: Path, cid: str) -> Path:
    return out / "cases" / f"{cid}.npz"


def read_finished(npz: Path, phash: str):
    """Meta of a finished case whose plan matches, else None."""
    try:
        with np.load(npz, allow_pickle=False) as z:
            if str(z["plan_hash"]) != phash:
                return None
            return json.loads(str(z["meta"]))
    except Exception:
        return None


def process_case(task: dict) -> dict:
    """Worker: preprocess one case and write ``cases/<id>.npz`` atomically. Never raises for user errors."""
    _limit_threads()
    from glam3d.utils.io import atomic_save_npz

    from .pipeline import preprocess_label, preprocess_scan

    case: Case = task["case"]
    t0 = time.time()
    res = {"id": case.id, "split": case.split, "status": "failed", "meta": None, "error": None, "seconds": 0.0}
    npz = Path(task["npz"])
    try:
        if case.error:
            raise UserError(case.error)
        if npz.exists() and not task["overwrite"]:
            meta = read_finished(npz, task["plan_hash"])
            if meta is not None:
                res.update(status="skipped", meta=meta)
                return res
        img, data = read_image(case, task["allow_channels"])
        lab = None
        if case.label is not None:
            lab = read_label(case.label, img, case.images[0], task["declared"])
        arr, meta = preprocess_scan(img, task["plan"], _data=data)
        meta["source_image"] = str(case.images[0]) if len(case.images) == 1 else [str(p) for p in case.images]
        meta["source_label"] = str(case.label) if case.label is not None else None
        arrays = {"image": arr, "meta": np.array(json.dumps(meta)), "plan_hash": np.array(task["plan_hash"])}
        if lab is not None:
            arrays["label"] = preprocess_label(lab, img.affine, meta, task["plan"])
        atomic_save_npz(npz, **arrays)
        res.update(status="done", meta=meta)
    except UserError as exc:
        res["error"] = str(exc)
        if task.get("debug"):
            import traceback

            res["traceback"] = traceback.format_exc()
    except Exception as exc:  # an unexpected failure on one case must not stop the others
        import traceback

        res["error"] = f"{case.images[0]}: unexpected {type(exc).__name__}: {exc}".replace("\n", " ")
        res["traceback"] = traceback.format_exc()
    finally:
        res["seconds"] = time.time() - t0
    return res


def _limit_threads():
    n = os.environ.get("OMP_NUM_THREADS")
    try:
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n) if n and n.isdigit() else 1)
    except Exception:
        pass


def run_pool(func, tasks, workers: int, desc: str, strict: bool = False, quiet: bool = False, on_result=None):
    """Run ``func`` over ``tasks`` (in-process, or a process pool when ``workers`` > 1), tqdm progress;
    ``on_result(res)`` per result.
    With ``strict``, stops at the first failed result (remaining work cancelled) and raises its UserError."""
    from tqdm import tqdm

    bar = tqdm(total=len(tasks), desc=desc, unit="case", file=sys.stderr, disable=quiet or None, leave=False)
    results = []

    def handle(res):
        results.append(res)
        bar.update(1)
        if on_result:
            on_result(res, bar)
        if strict and res.get("status") == "failed":
            raise UserError(f"{res['error']} (--strict: stopping)")

    try:
        if workers <= 1 or len(tasks) <= 1:
            for t in tasks:
                handle(func(t))
        else:
            import concurrent.futures as cf
            import multiprocessing as mp

            if sys.platform.startswith("linux"):
                # fork: workers inherit the (slow, ~several seconds) MONAI/torch import; nothing has started
                # threads in this process yet (no tensor operations run here), so forking is safe
                import monai.transforms  # noqa: F401

                ctx = mp.get_context("fork")
            else:
                ctx = mp.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
                futs = [ex.submit(func, t) for t in tasks]
                try:
                    for f in cf.as_completed(futs):
                        handle(f.result())
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
    finally:
        bar.close()
    return results
