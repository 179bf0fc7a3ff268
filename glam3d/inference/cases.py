"""The scans ``glam3d predict`` segments: case discovery (NIfTI files, folders of them, DICOM series), reading,
and the checks made before anything is written.

* :func:`collect_cases` expands input paths into :class:`Case` s (a folder of NIfTI files, a DICOM series folder,
  or a folder of series folders; names are the output stems).
* :func:`load_case` reads a case as a ``nib.Nifti1Image``; DICOM through SimpleITK, converted from its LPS world
  to nibabel's RAS (:func:`read_dicom_series`, :func:`sitk_to_nibabel`).
* :func:`check_readable` is the cheap header check made for every case before any output is written.
* :class:`PredictionFiles` is the checked set of cases and where their outputs go.
* :func:`image_case` makes a case of one path or one nibabel image (``Predictor.predict``).

Example::

    files = PredictionFiles.check(["scans/", "dicom_series/"], "preds/")
    [c.name for c in files.cases]                      # ["img0001", "img0002", "dicom_series"]
    image = load_case(files.cases[0])                  # nib.Nifti1Image, the scan's own geometry
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import UserError

__all__ = ["Case", "collect_cases", "load_case", "check_readable", "read_dicom_series", "sitk_to_nibabel",
           "PredictionFiles", "image_case", "preprocessing_pipeline"]


def preprocessing_pipeline():
    """``preprocessing.pipeline`` (looked up at each use, so tests can substitute a pipeline)."""
    try:
        from preprocessing import pipeline
    except ImportError as err:
        raise UserError(f"the preprocessing package is not available ({err})") from None
    return pipeline


@dataclass
class Case:
    """One scan to segment: a NIfTI file, a DICOM series (a folder and its series id) or an image in memory."""
    name: str          # output stem
    source: Path       # file (NIfTI) or folder (DICOM)
    kind: str          # "nifti" | "dicom" | "image" (a nibabel image given in memory)
    series_id: Optional[str] = None
    files: list = field(default_factory=list)  # every file read (for the "never overwrite an input" check)
    image: object = None  # kind "image": the nibabel image


def _is_nifti(p: Path) -> bool:
    return p.is_file() and p.name.endswith((".nii", ".nii.gz")) and not p.name.startswith(".")


def _nifti_stem(p: Path) -> str:
    for ext in (".nii.gz", ".nii"):
        if p.name.endswith(ext):
            return p.name[: -len(ext)]
    return p.stem


def _dicom_series(folder: Path) -> list[tuple[str, list[str]]]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader
    try:
        ids = reader.GetGDCMSeriesIDs(str(folder)) or ()
    except RuntimeError:
        ids = ()
    return [(sid, list(reader.GetGDCMSeriesFileNames(str(folder), sid))) for sid in ids]


def collect_cases(inputs) -> list[Case]:
    """Expand the ``--input`` paths into cases (sorted within a folder, in argument order across them)."""
    cases: list[Case] = []
    for raw in inputs:
        path = Path(raw)
        if not path.exists():
            raise UserError("input not found", path)
        if path.is_file():
            if not _is_nifti(path):
                raise UserError("not a NIfTI file (.nii/.nii.gz); give DICOM series as their folder", path)
            cases.append(Case(_nifti_stem(path), path, "nifti", files=[path]))
            continue
        niftis = sorted(p for p in path.iterdir() if _is_nifti(p))
        if niftis:
            cases.extend(Case(_nifti_stem(p), p, "nifti", files=[p]) for p in niftis)
            continue
        found = _series_cases(path, path.name)
        if not found:  # a folder of series folders (one level)
            for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
                found.extend(_series_cases(sub, sub.name))
        if not found:
            raise UserError("no NIfTI files or DICOM series in this folder", path)
        cases.extend(found)
    names = {}
    for c in cases:
        if c.name in names and names[c.name] != c.source:
            raise UserError(f"two inputs would both be written as {c.name}.nii.gz ({names[c.name]} and "
                            f"{c.source}); predict them into different --output folders", c.source)
        names[c.name] = c.source
    seen, unique = set(), []
    for c in cases:  # the same file given twice is predicted once
        key = (str(c.source.resolve()), c.series_id)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    return unique


def _series_cases(folder: Path, name: str) -> list[Case]:
    series = _dicom_series(folder)
    if len(series) == 1:
        return [Case(name, folder, "dicom", series[0][0], [Path(f) for f in series[0][1]])]
    return [Case(f"{name}_{i + 1}", folder, "dicom", sid, [Path(f) for f in files])
            for i, (sid, files) in enumerate(series)]


def read_dicom_series(folder: Path, series_id: Optional[str] = None):
    """A DICOM series as a ``nib.Nifti1Image``: SimpleITK's LPS geometry converted to RAS (x, y negated)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    try:
        files = (reader.GetGDCMSeriesFileNames(str(folder), series_id) if series_id
                 else reader.GetGDCMSeriesFileNames(str(folder)))
        reader.SetFileNames(files)
        img = reader.Execute()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        raise UserError(f"cannot read the DICOM series ({first[:200]})", folder) from None
    return sitk_to_nibabel(img)


def sitk_to_nibabel(img):
    """SimpleITK image (LPS world) → ``nib.Nifti1Image`` (RAS world) with the same voxels and geometry."""
    import nibabel as nib
    import SimpleITK as sitk

    if img.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {img.GetDimension()}D")
    arr = sitk.GetArrayFromImage(img)                     # (z, y, x) = (k, j, i)
    arr = np.transpose(arr, (2, 1, 0))                     # nibabel (i, j, k): a Fortran-ordered view, no copy
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    out = nib.Nifti1Image(arr, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def load_case(case: Case):
    """The scan of ``case`` as a 3D ``nib.Nifti1Image`` (a 4D NIfTI of one volume made 3D); :class:`UserError`
    naming the file when it cannot be read."""
    import nibabel as nib

    if case.kind == "dicom":
        return read_dicom_series(case.source, case.series_id)
    if case.kind == "image":
        return case.image
    try:
        img = nib.load(str(case.source))
        shape = img.shape
    except Exception as err:  # nibabel raises several types for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read NIfTI ({first[:200]})", case.source) from None
    if len(shape) == 4 and shape[3] == 1:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header)
    elif len(shape) != 3:
        raise UserError(f"expected a 3D scan, got shape {shape}", case.source)
    return img


def check_readable(case: Case) -> None:
    """Cheap up-front check (header only) so a bad input fails before any output is written."""
    if case.kind == "dicom":
        if not case.files:
            raise UserError("empty DICOM series", case.source)
        return
    import nibabel as nib

    try:
        img = nib.load(str(case.source))
        shape = img.shape
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read NIfTI ({first[:200]})", case.source) from None
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise UserError(f"expected a 3D scan, got shape {shape}", case.source)
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise UserError("the NIfTI header has no valid affine (orientation unknown)", case.source)
    check = getattr(preprocessing_pipeline(), "check_stored_pixdims", None)
    if check is not None:
        check(case.source)


# ------------------------------------------------------------------------------------------------ checkpoint


def image_case(image) -> Case:
    """One scan for ``Predictor.predict``: a path (a NIfTI file, or a folder holding one DICOM series or one
    NIfTI file), checked as :func:`check_readable` does, or a nibabel image (3D, or 4D of one volume) with a
    valid affine. :class:`UserError` naming the input otherwise."""
    import nibabel as nib

    if isinstance(image, (str, os.PathLike)):
        cases = collect_cases([image])
        if len(cases) != 1:
            raise UserError(f"holds {len(cases)} scans; predict one at a time, or all of them with "
                            f"Predictor.predict_files", image)
        check_readable(cases[0])
        return cases[0]
    if not isinstance(image, nib.spatialimages.SpatialImage):
        raise TypeError(f"image must be a path (NIfTI file, DICOM series folder) or a nibabel image, got "
                        f"{type(image).__name__}")
    name = image.get_filename()
    source = Path(name) if name else Path("<image>")
    shape = tuple(image.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise UserError(f"expected a 3D scan, got shape {shape}", source)
    if not np.all(np.isfinite(image.affine)) or abs(np.linalg.det(np.asarray(image.affine)[:3, :3])) < 1e-12:
        raise UserError("the image has no valid affine (orientation unknown)", source)
    if not isinstance(image, nib.Nifti1Image):
        image = nib.Nifti1Image.from_image(image)
    if len(shape) == 4:
        image = nib.Nifti1Image(np.asanyarray(image.dataobj)[..., 0], image.affine, image.header)
    stem = _nifti_stem(source) if name else "image"
    return Case(stem, source, "image", files=[source] if name else [], image=image)


@dataclass
class PredictionFiles:
    """The cases to segment and where their outputs go, checked before anything is written (:meth:`check`).

    ``output_dir/<case>.nii.gz`` (and ``<case>_probabilities.nii.gz``) are the outputs (:meth:`label_path`,
    :meth:`probability_path`); ``scratch`` the folder of a scan's temporary files (None: in memory)."""
    cases: list
    output_dir: Path
    scratch: Optional[Path]

    def label_path(self, case: Case) -> Path:
        """Where ``case``'s label map goes."""
        return self.output_dir / f"{case.name}.nii.gz"

    def probability_path(self, case: Case) -> Path:
        """Where ``case``'s class probabilities go."""
        return self.output_dir / f"{case.name}_probabilities.nii.gz"

    @classmethod
    def check(cls, inputs: Sequence[Union[str, os.PathLike]], output_dir, scratch: Union[bool, str, os.PathLike,
              None] = True) -> "PredictionFiles":
        """Expand ``inputs`` (:func:`collect_cases`) and check, in this order: ``output_dir`` is (or can be) a
        folder and is not one of the input folders; ``scratch`` (True: the output folder; False or None: no
        scratch folder, in memory; a path: an existing writable folder); no output would replace an input;
        every scan's header is readable (:func:`check_readable`). :class:`UserError` at the first problem."""
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        out_dir = Path(output_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError("--output must be a folder", out_dir)
        cases = collect_cases(inputs)
        input_files = {p.resolve() for c in cases for p in c.files}
        input_dirs = {Path(p).resolve() for p in inputs if Path(p).is_dir()}
        if out_dir.resolve() in input_dirs:
            raise UserError("--output is one of the --input folders; write predictions to a separate folder",
                            out_dir)
        folder = out_dir if scratch is True else (None if scratch is False or scratch is None else Path(scratch))
        if folder is not None and folder != out_dir:
            if not folder.is_dir():
                raise UserError("--scratch must be an existing folder (or 'none')", folder)
            try:
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as err:
                raise UserError(f"--scratch: cannot write there ({err.strerror or err})", folder) from None
        files = cls(cases, out_dir, folder)
        for c in cases:
            for target in (files.label_path(c).resolve(), files.probability_path(c).resolve()):
                if target in input_files:
                    raise UserError(f"refusing to write {target.name}: that file is an input", target)
        for c in cases:
            check_readable(c)
        return files
