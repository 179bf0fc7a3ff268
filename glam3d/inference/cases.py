"""The scans ``glam3d predict`` segments: case discovery (image files, folders of them, nnU-Net channel files, DICOM
series), reading, where the outputs go, and the checks made before anything is written.

* :func:`collect_cases` expands input paths into :class:`Case` s: an image file (NIfTI through nibabel; ``.mha``,
  ``.mhd``, ``.nrrd``, ``.nhdr``, ``.gipl`` through SimpleITK), a folder of them, nnU-Net's ``<case>_XXXX`` channel
  files grouped into one case (:func:`group_files`, the rule below), a DICOM series folder, or a folder of series
  folders. A case's ``name`` is its id: the output's file stem.
* :func:`load_case` reads a case as a ``nib.Nifti1Image`` (``(X, Y, Z)``, or ``(X, Y, Z, C)`` for channel files);
  DICOM through SimpleITK, converted from its LPS world to nibabel's RAS (:func:`read_dicom_series`).
* :func:`check_readable` is the cheap header check made for every case before any output is written (shape,
  channels, affine: :func:`preprocessing.imageio.check_affine`, the one affine check of glam3d).
* :class:`PredictionFiles` is the checked set of cases and where their outputs go (``<case><ending>``, the input's
  format by default, or ``format``).
* :func:`image_case` makes a case of one path or one nibabel image (``Predictor.predict``).

Which files make one case (:func:`group_files`; ``spec`` is what the checkpoint says about its inputs: the number
of channels ``C`` and, for datasets preprocessed from nnU-Net v2 / MSD folders, the layout and file ending):

* **nnU-Net v2** (the checkpoint's data came from an nnU-Net v2 folder): nnU-Net's own rule. Every image is
  ``<case>_XXXX<file_ending>``, ``XXXX`` the 4-digit channel number; the files of a case are grouped and must be
  exactly channels ``0000`` … ``C-1``. ``case_0000.nii.gz`` + ``case_0001.nii.gz`` is the case ``case``; a file not
  named so is an error naming it.
* **MSD v1**: one file per case (a 4D file for several channels), named by its id and never cut at trailing digits:
  ``amos_0001.nii.gz`` is the case ``amos_0001``. With ``C > 1``, a complete set of channel files
  ``<case>_0000`` … ``<case>_XXXX`` (C of them) is also read as one case.
* **Layout not recorded** (Synapse, older checkpoints): ``C > 1`` as MSD. ``C = 1``: a folder (or list of files)
  in which *every* image is named ``<stem>_0000<ending>`` is nnU-Net's single-channel ``imagesTs`` and its cases
  are the stems without ``_0000``; otherwise every file is its own case, named by its whole stem (so ``amos_0001``,
  ``amos_0002`` stay two cases of those names).

Example::

    files = PredictionFiles.check(["imagesTs/", "dicom_series/"], "preds/", spec=InputSpec(2, "nnunet-v2"))
    [c.name for c in files.cases]                      # ["case_a", "case_b", "dicom_series"]
    files.label_path(files.cases[0])                   # preds/case_a.nii.gz
    image = load_case(files.cases[0])                  # nib.Nifti1Image (X, Y, Z, 2), the scan's own geometry
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..errors import UserError

__all__ = ["Case", "InputSpec", "collect_cases", "group_files", "load_case", "check_readable", "read_dicom_series",
           "sitk_to_nibabel", "PredictionFiles", "image_case", "preprocessing_pipeline", "OUTPUT_FORMATS",
           "output_format", "input_ending"]

#: ``--format`` values and the file endings they write: single files only (a detached ``.mhd`` / ``.nhdr`` header
#: with its data file could not be published atomically; such inputs are written as ``.mha`` / ``.nrrd``)
OUTPUT_FORMATS = {"nii.gz": ".nii.gz", "nii": ".nii", "mha": ".mha", "nrrd": ".nrrd", "gipl": ".gipl",
                  "gipl.gz": ".gipl.gz"}
NIFTI_ENDINGS = (".nii.gz", ".nii")
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")   # nnU-Net's <case>_XXXX


def preprocessing_pipeline():
    """``preprocessing.pipeline`` (looked up at each use, so tests can substitute a pipeline)."""
    try:
        from preprocessing import pipeline
    except ImportError as err:
        raise UserError(f"the preprocessing package is not available ({err})") from None
    return pipeline


def _imageio():
    try:
        from preprocessing import imageio
    except ImportError as err:
        raise UserError(f"the preprocessing package is not available ({err})") from None
    return imageio


@dataclass(frozen=True)
class InputSpec:
    """What a checkpoint expects of a case: ``channels`` (the network's input channels), and where its training data
    came from: ``layout`` (``"nnunet-v2"``, ``"msd"`` or None: not recorded) and ``file_ending`` (nnU-Net v2's
    ``file_ending``, None: any image ending)."""
    channels: int = 1
    layout: Optional[str] = None
    file_ending: Optional[str] = None


@dataclass
class Case:
    """One scan to segment: image file(s) (one per channel for nnU-Net channel files), a DICOM series (a folder and
    its series id) or an image in memory."""
    name: str          # the case id: the output's stem
    source: Path       # the (first) file, or the DICOM folder
    kind: str          # "file" (NIfTI or another SimpleITK format) | "dicom" | "image" (a nibabel image in memory)
    series_id: Optional[str] = None
    files: list = field(default_factory=list)  # every file read, channel files in channel order
    image: object = None  # kind "image": the nibabel image


def _ending(name: str) -> Optional[str]:
    """The image ending of a file name (``.nii.gz``, ``.mha``, …; case-insensitive), None for other files."""
    low = name.lower()
    return next((name[len(name) - len(e):] for e in _imageio().IMAGE_ENDINGS if low.endswith(e)), None)


def _stem(p: Path) -> str:
    e = _ending(p.name)
    return p.name[: len(p.name) - len(e)] if e else p.stem


def input_ending(case: Case) -> str:
    """The ending of the file an output of ``case`` gets by default: the input's own format (a detached ``.mhd`` /
    ``.nhdr`` header as ``.mha`` / ``.nrrd``), ``.nii.gz`` for DICOM series and images in memory."""
    if case.kind != "file":
        return ".nii.gz"
    e = (_ending(case.files[0].name) or ".nii.gz").lower()
    return {".mhd": ".mha", ".nhdr": ".nrrd"}.get(e, e)


def output_format(value: Optional[str]) -> Optional[str]:
    """``--format`` as a file ending (``"mha"`` or ``".mha"`` -> ``".mha"``); None (or ``"input"``): each input's
    own format. :class:`UserError` for a format glam3d does not write."""
    if value is None or value == "input":
        return None
    key = str(value).lower().lstrip(".")
    if key not in OUTPUT_FORMATS:
        raise UserError(f"--format: {value!r} is not a format glam3d writes ({', '.join(OUTPUT_FORMATS)}, or input: "
                        f"the input's own)")
    return OUTPUT_FORMATS[key]


def _is_image(p: Path) -> bool:
    return not p.name.startswith(".") and (p.is_file() or p.is_symlink()) and _ending(p.name) is not None


def _dicom_series(folder: Path) -> list[tuple[str, list[str]]]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader
    try:
        ids = reader.GetGDCMSeriesIDs(str(folder)) or ()
    except RuntimeError:
        ids = ()
    return [(sid, list(reader.GetGDCMSeriesFileNames(str(folder), sid))) for sid in ids]


def group_files(paths: Sequence[Path], spec: InputSpec = InputSpec(), siblings: bool = False) -> list[Case]:
    """The cases the image files ``paths`` (of one folder) make, by the rule of the module doc. ``siblings``: the
    files were named one by one, so a channel file brings the other channel files of its case from its folder.
    :class:`UserError` naming the file for a file nnU-Net v2's rule cannot place, or a case whose channel files
    are not exactly ``0000`` … ``C-1``."""
    paths = sorted(dict.fromkeys(Path(p) for p in paths), key=lambda p: p.name)
    if not paths:
        return []
    c = max(int(spec.channels), 1)
    v2 = spec.layout == "nnunet-v2"
    match = {p: _CHANNEL_SUFFIX.match(_stem(p)) for p in paths}
    if not v2 and c == 1:
        strip = spec.layout != "msd" and all(m and m.group("channel") == "0000" for m in match.values())
        return [Case(match[p].group("case") if strip else _stem(p), p, "file", files=[p]) for p in paths]
    groups: dict = {}
    cases = []
    for p in paths:
        m = match[p]
        if m is None:
            if v2:
                raise UserError(f"not named <case>_XXXX{spec.file_ending or _ending(p.name)} (nnU-Net v2 names each "
                                f"channel file with its 4-digit channel number; the checkpoint's data is an nnU-Net "
                                f"v2 dataset)", p)
            cases.append(Case(_stem(p), p, "file", files=[p]))
            continue
        groups.setdefault((m.group("case"), _ending(p.name).lower()), {})[int(m.group("channel"))] = p
    if siblings:  # a named channel file: its case's other channel files, from its folder
        for (cid, end), chans in groups.items():
            folder = next(iter(chans.values())).parent
            pat = re.compile(re.escape(cid) + r"_(\d{4})" + re.escape(end) + "$", re.IGNORECASE)
            for q in (folder.iterdir() if folder.is_dir() else ()):
                m = pat.match(q.name)
                if m and _is_image(q):
                    chans.setdefault(int(m.group(1)), q)
    for (cid, _), chans in groups.items():
        want = list(range(c))
        if sorted(chans) == want:
            files = [chans[i] for i in want]
            cases.append(Case(cid, files[0], "file", files=files))
            continue
        if not v2:  # MSD / not recorded: files named with digits that are not a complete channel set are cases
            cases.extend(Case(_stem(p), p, "file", files=[p]) for _, p in sorted(chans.items()))
            continue
        first = chans[min(chans)]
        missing = [i for i in want if i not in chans]
        if missing:
            raise UserError(f"case {cid}: channel file {cid}_{missing[0]:04d}{_ending(first.name)} is missing (the "
                            f"network takes {c} channel(s), _0000 to _{c - 1:04d})", first.parent)
        extra = chans[min(i for i in chans if i >= c)]
        raise UserError(f"case {cid}: channel {extra.name} is one more than the network's {c} channel(s) "
                        f"(_0000 to _{c - 1:04d})", extra)
    return sorted(cases, key=lambda k: k.name)


def collect_cases(inputs, spec: InputSpec = InputSpec()) -> list[Case]:
    """Expand the ``--input`` paths into cases (sorted within a folder, in argument order across them); files named
    one by one are grouped per folder as a folder's files are (:func:`group_files`)."""
    cases: list[Case] = []
    named: dict = {}   # folder -> image files named one by one (grouped once all are known)
    endings = (spec.file_ending,) if spec.layout == "nnunet-v2" and spec.file_ending else None
    for raw in inputs:
        path = Path(raw)
        if not path.exists() and not path.is_symlink():
            raise UserError("input not found", path)
        if not path.is_dir():
            if _ending(path.name) is None:
                raise UserError("not a NIfTI file (.nii, .nii.gz) nor another 3D image format glam3d reads "
                                "(.mha, .mhd, .nrrd, .nhdr, .gipl); give DICOM series as their folder", path)
            named.setdefault(path.parent, []).append(path)
            continue
        images = [p for p in sorted(path.iterdir()) if _is_image(p)
                  and (endings is None or p.name.lower().endswith(endings[0].lower()))]
        if images:
            cases.extend(group_files(images, spec))
            continue
        found = _series_cases(path, path.name)
        if not found:  # a folder of series folders (one level)
            for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
                found.extend(_series_cases(sub, sub.name))
        if not found:
            raise UserError("no image files (NIfTI, .mha, .nrrd, …) or DICOM series in this folder", path)
        cases.extend(found)
    for files in named.values():
        cases.extend(group_files(files, spec, siblings=True))
    seen, unique = set(), []
    for c in cases:  # the same file given twice (by name and in its folder) is predicted once
        key = (tuple(str(p.resolve()) for p in c.files) if c.kind == "file" else (str(c.source.resolve()),),
               c.series_id)
        if key not in seen:
            seen.add(key)
            unique.append(c)
    names = {}
    for c in unique:
        if c.name in names:
            raise UserError(f"two inputs would both be written as {c.name} ({names[c.name]} and {c.source}); predict "
                            f"them into different --output folders", c.source)
        names[c.name] = c.source
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
    affine = _imageio().sitk_affine(img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    out = nib.Nifti1Image(arr, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def _nifti_error(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"cannot read NIfTI ({first[:200]})"


def load_case(case: Case):
    """The scan of ``case`` as a ``nib.Nifti1Image``: 3D, or ``(X, Y, Z, C)`` for several channels (channel files
    stacked by :func:`preprocessing.imageio.load_channels`, which checks they share one grid); a 4D NIfTI of one
    volume made 3D. NIfTI is read lazily by nibabel, other formats by SimpleITK. :class:`UserError` naming the file
    when it cannot be read."""
    import nibabel as nib

    if case.kind == "dicom":
        return read_dicom_series(case.source, case.series_id)
    if case.kind == "image":
        return case.image
    if len(case.files) > 1 or _ending(case.source.name).lower() not in NIFTI_ENDINGS:
        return _imageio().load_channels(case.files)
    try:
        img = nib.load(str(case.source))
        shape = img.shape
    except Exception as err:  # nibabel raises several types for bad files
        raise UserError(_nifti_error(err), case.source) from None
    if len(shape) == 4 and shape[3] == 1:
        img = nib.Nifti1Image(np.asanyarray(img.dataobj)[..., 0], img.affine, img.header)
    elif len(shape) not in (3, 4):
        raise UserError(f"expected a 3D scan, got shape {shape}", case.source)
    return img


def _header(path: Path):
    """``(shape, affine)`` of an image file without its voxels (NIfTI: nibabel, with glam3d's NIfTI messages)."""
    if _ending(path.name).lower() in NIFTI_ENDINGS:
        import nibabel as nib

        try:
            img = nib.load(str(path))
            return tuple(img.shape), np.asarray(img.affine, float)
        except Exception as err:
            raise UserError(_nifti_error(err), path) from None
    return _imageio().read_header(path)


def check_readable(case: Case, channels: int = 1) -> None:
    """Cheap up-front check (headers only) so a bad input fails before any output is written: readable, 3D (or
    one 4D file of ``channels`` volumes), a finite full-rank affine (:func:`preprocessing.imageio.check_affine`),
    plausible stored voxel sizes (NIfTI); the channel files of a case share one grid."""
    if case.kind == "dicom":
        if not case.files:
            raise UserError("empty DICOM series", case.source)
        return
    if case.kind == "image":
        return
    io = _imageio()
    first = None
    for p in case.files:
        io.check_input_file(p)
        shape, affine = _header(p)
        single = len(case.files) == 1
        if not (len(shape) == 3 or (len(shape) == 4 and (shape[3] == 1 or (single and shape[3] == channels)))):
            want = f"3D, or 4D of {channels} volumes" if single and channels > 1 else "3D"
            raise UserError(f"expected a 3D scan ({want}), got shape {shape}", p)
        io.check_affine(affine, p)
        if _ending(p.name).lower() in NIFTI_ENDINGS:
            check = getattr(preprocessing_pipeline(), "check_stored_pixdims", None)
            if check is not None:
                check(p)
        if first is None:
            first = (p, shape, affine)
        elif tuple(shape[:3]) != tuple(first[1][:3]) or not np.allclose(affine, first[2], rtol=1e-4, atol=1e-3):
            raise UserError(f"channel file's grid (shape {tuple(shape[:3])}) differs from {first[0].name}'s "
                            f"(shape {tuple(first[1][:3])}, or its affine)", p)


def image_case(image, spec: InputSpec = InputSpec()) -> Case:
    """One scan for ``Predictor.predict``: a path (an image file, a channel file of a case, or a folder holding one
    DICOM series or one case's files), checked as :func:`check_readable` does, or a nibabel image (3D, ``(X, Y, Z,
    C)`` for several channels, or 4D of one volume) with a valid affine. :class:`UserError` naming the input
    otherwise."""
    import nibabel as nib

    if isinstance(image, (str, os.PathLike)):
        cases = collect_cases([image], spec)
        if len(cases) != 1:
            raise UserError(f"holds {len(cases)} scans; predict one at a time, or all of them with "
                            f"Predictor.predict_files", image)
        check_readable(cases[0], spec.channels)
        return cases[0]
    if not isinstance(image, nib.spatialimages.SpatialImage):
        raise TypeError(f"image must be a path (an image file, DICOM series folder) or a nibabel image, got "
                        f"{type(image).__name__}")
    name = image.get_filename()
    source = Path(name) if name else Path("<image>")
    shape = tuple(image.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, spec.channels))):
        raise UserError(f"expected a 3D scan, got shape {shape}", source)
    _imageio().check_affine(image.affine, source)
    if not isinstance(image, nib.Nifti1Image):
        image = nib.Nifti1Image.from_image(image)
    if len(shape) == 4 and shape[3] == 1:
        image = nib.Nifti1Image(np.asanyarray(image.dataobj)[..., 0], image.affine, image.header)
    stem = _stem(source) if name else "image"
    return Case(stem, source, "image", files=[source] if name else [], image=image)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@dataclass
class PredictionFiles:
    """The cases to segment and where their outputs go, checked before anything is written (:meth:`check`).

    ``output_dir/<case><ending>`` is a case's label map (:meth:`label_path`; ``ending``: ``format``, or the input's
    own, :func:`input_ending`) and ``<case>_probabilities.nii.gz`` its class probabilities (:meth:`probability_path`;
    ``.nii`` when the label maps are ``.nii``); ``scratch`` the folder of a scan's temporary files (None: memory)."""
    cases: list
    output_dir: Path
    scratch: Optional[Path]
    format: Optional[str] = None

    def ending(self, case: Case) -> str:
        """The file ending of ``case``'s label map."""
        return self.format or input_ending(case)

    def label_path(self, case: Case) -> Path:
        """Where ``case``'s label map goes."""
        return self.output_dir / f"{case.name}{self.ending(case)}"

    def probability_path(self, case: Case) -> Path:
        """Where ``case``'s class probabilities go (NIfTI, written plane by plane: never held whole)."""
        return self.output_dir / f"{case.name}_probabilities{'.nii' if self.ending(case) == '.nii' else '.nii.gz'}"

    @classmethod
    def check(cls, inputs: Sequence[Union[str, os.PathLike]], output_dir, scratch: Union[bool, str, os.PathLike,
              None] = True, *, spec: InputSpec = InputSpec(), format: Optional[str] = None) -> "PredictionFiles":
        """Expand ``inputs`` (:func:`collect_cases` with ``spec``) and check, in this order: ``output_dir`` is (or can
        be) a folder, and is neither inside a folder given as input (a folder of scans, a DICOM series folder) nor
        the folder of an input file; ``format`` is one glam3d writes; ``scratch`` (True: the output folder; False
        or None: no scratch folder, in memory; a path: an existing writable folder); no output would replace an
        input; every scan's header is readable (:func:`check_readable`). :class:`UserError` at the first
        problem."""
        if isinstance(inputs, (str, os.PathLike)):
            inputs = [inputs]
        out_dir = Path(output_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError("--output must be a folder", out_dir)
        fmt = output_format(format)
        cases = collect_cases(inputs, spec)
        out_r = out_dir.resolve()   # links followed: a link into an input folder is inside it
        for p in map(Path, inputs):
            folder = p.resolve() if p.is_dir() else p.resolve().parent
            if (_inside(out_r, folder) if p.is_dir() else out_r == folder):
                what = f"the --input folder {p} or inside it" if p.is_dir() else f"the folder of the input file {p}"
                raise UserError(f"--output is {what}: write predictions to a folder outside the inputs (input files "
                                f"are never modified, and a later run over the inputs would read the predictions as "
                                f"scans)", out_dir)
        folder = out_dir if scratch is True else (None if scratch is False or scratch is None else Path(scratch))
        if folder is not None and folder != out_dir:
            if not folder.is_dir():
                raise UserError("--scratch must be an existing folder (or 'none')", folder)
            try:
                tempfile.TemporaryFile(dir=folder).close()
            except OSError as err:
                raise UserError(f"--scratch: cannot write there ({err.strerror or err})", folder) from None
        files = cls(cases, out_dir, folder, fmt)
        input_files = {p.resolve() for c in cases for p in c.files}
        for c in cases:
            for target in (files.label_path(c).resolve(), files.probability_path(c).resolve()):
                if target in input_files:
                    raise UserError(f"refusing to write {target.name}: that file is an input", target)
        for c in cases:
            check_readable(c, spec.channels)
        return files
