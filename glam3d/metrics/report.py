"""Evaluation reports: per-case, per-organ Dice/HD95 of a folder of predictions against a folder of truths.

``evaluate_folders(pred_dir, gt_dir, labels, convention) -> per_case`` reads and checks the NIfTI pairs;
``write_report(per_case, out_dir, label_names, convention, provenance) -> summary`` writes ``report.json``,
``report.csv``, ``report.md`` (paper table: organs as columns, mean ± std) and ``report.png`` (box plots).

Example::

    per_case = evaluate_folders("preds/", "RawData/Training/label", "synapse", "glam3d")
    summary = write_report(per_case, "report/", [n for n, _ in resolve_labels("synapse")], "glam3d",
                           provenance=load_provenance("preds/"))
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import math
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import UserError
from ..utils.io import atomic_path, atomic_write_json
from .segmentation import CONVENTION_NOTES, HD_UNITS, case_metrics, check_convention, nan_mean_std

# Synapse evaluation: the 8 organs in the order papers print them, with their raw BTCV label ids
SYNAPSE_ORGANS = [("aorta", 8), ("gallbladder", 4), ("left kidney", 3), ("right kidney", 2), ("liver", 6),
                  ("pancreas", 11), ("spleen", 1), ("stomach", 7)]

REPORT_FILES = ("report.json", "report.csv", "report.md", "report.png")


# ------------------------------------------------------------------------------------------------ labels
def _name_key(name: str) -> str:
    """'kidney_left', 'Left Kidney', 'left-kidney' → 'kidney left' (word order and separators ignored)."""
    words = re.split(r"[\s_\-()]+", str(name).lower())
    words = [{"l": "left", "r": "right"}.get(w, w) for w in words if w]
    return " ".join(sorted(words))


def labels_from_dataset(labels: dict, plan: Optional[dict] = None) -> list[tuple[str, int]]:
    """``(name, label value in the files)`` for every foreground class of a dataset's ``labels`` mapping
    (``{"0": "background", "1": "spleen", …}``), with ``plan["label_values"]`` mapping training indices back to
    the original label values. Classes that are Synapse organs come first in the Synapse column order."""
    values = {}
    if plan and plan.get("label_values"):
        values = {int(k): int(v) for k, v in plan["label_values"].items()}
    out = []
    for k, name in sorted(((int(k), v) for k, v in labels.items()), key=lambda kv: kv[0]):
        if k == 0:
            continue
        out.append((str(name), values.get(k, k)))
    order = {_name_key(n): i for i, (n, _) in enumerate(SYNAPSE_ORGANS)}
    syn = sorted([o for o in out if _name_key(o[0]) in order], key=lambda o: order[_name_key(o[0])])
    return syn + [o for o in out if _name_key(o[0]) not in order]


def resolve_labels(spec) -> list[tuple[str, int]]:
    """``"synapse"`` (the 8 Synapse organs, raw BTCV ids), a path to a ``dataset.json`` (its ``labels`` and
    ``plan.label_values``), a dict ``{"labels": …, "plan": …}`` or a list of ``(name, value)``."""
    if isinstance(spec, (list, tuple)):
        return [(str(n), int(v)) for n, v in spec]
    if isinstance(spec, dict):
        return labels_from_dataset(spec.get("labels", spec), spec.get("plan"))
    if str(spec).lower() == "synapse":
        return list(SYNAPSE_ORGANS)
    path = Path(spec)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise UserError("--labels must be 'synapse' or a dataset.json; file not found", path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read labels ({err})", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("labels"), dict):
        raise UserError("no 'labels' mapping in this dataset.json", path)
    out = labels_from_dataset(data["labels"], data.get("plan"))
    if not out:
        raise UserError("dataset.json lists no foreground labels", path)
    return out


# ------------------------------------------------------------------------------------------------ files
def list_nifti(folder) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.name.endswith((".nii", ".nii.gz")))


def nifti_stem(path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(path).stem


_PREFIX = re.compile(r"^(label|labels|img|image|images|seg|pred|prediction|mask|gt)[_\-]?", re.IGNORECASE)


def case_key(path) -> str:
    """Case id used to pair files: the stem without a leading img/label/seg/pred… word and an nnU-Net channel
    suffix (``img0001`` and ``label0001`` → ``0001``; ``case_7_0000`` → ``case_7``)."""
    stem = nifti_stem(path)
    m = re.fullmatch(r"(.+)_0000", stem)  # nnU-Net channel suffix of an image file
    if m:
        stem = m.group(1)
    key = _PREFIX.sub("", stem)
    return key or stem


def _find_label_folder(gt_dir: Path) -> Path:
    """Accept a raw BTCV layout folder (``RAW/label``) for the truth."""
    if list_nifti(gt_dir):
        return gt_dir
    for sub in ("label", "labels", "labelsTr", "labelsTs"):
        if (gt_dir / sub).is_dir() and list_nifti(gt_dir / sub):
            return gt_dir / sub
    raise UserError("no NIfTI label files (.nii/.nii.gz) in this folder", gt_dir)


def pair_cases(pred_dir, gt_dir) -> tuple[list[tuple[str, Path, Path]], list[Path]]:
    """``[(case, prediction, truth)]`` for every truth file, and the predictions that match no truth.
    A truth without a prediction is a :class:`UserError` naming the case."""
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    if not pred_dir.is_dir():
        raise UserError("prediction folder not found", pred_dir)
    if not gt_dir.is_dir():
        raise UserError("truth folder not found", gt_dir)
    gt_dir = _find_label_folder(gt_dir)
    preds = list_nifti(pred_dir)
    by_name = {p.name: p for p in preds}
    by_key: dict[str, list[Path]] = {}
    for p in preds:
        by_key.setdefault(case_key(p), []).append(p)
    pairs, used = [], set()
    for g in list_nifti(gt_dir):
        key = case_key(g)
        if g.name in by_name:
            p = by_name[g.name]
        elif len(by_key.get(key, [])) == 1:
            p = by_key[key][0]
        elif len(by_key.get(key, [])) > 1:
            raise UserError(f"case {key}: several predictions match ({', '.join(x.name for x in by_key[key])})",
                            pred_dir)
        else:
            raise UserError(f"case {key}: no prediction for truth {g.name}", pred_dir)
        if p in used:
            raise UserError(f"case {key}: prediction {p.name} matches several truth files", pred_dir)
        used.add(p)
        pairs.append((key, p, g))
    return pairs, [p for p in preds if p not in used]


def _load_labels(path: Path, case: str, what: str):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for bad files
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"case {case}: cannot read {what} ({first[:200]})", path) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"case {case}: {what} is not a 3D label map (shape {data.shape})", path)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise UserError(f"case {case}: {what} holds non-integer values, not a label map", path)
    if data.min() < 0 or data.max() > 65535:
        raise UserError(f"case {case}: {what} label values out of range ({data.min()}..{data.max()})", path)
    # integer maps keep their stored dtype (uint8: a quarter of int32 on a long CT); float-stored ones become int32
    return img, (data if np.issubdtype(data.dtype, np.integer) else data.astype(np.int32))


def voxel_spacing(affine: np.ndarray) -> tuple:
    """Spacing of the array axes in mm (column norms of the affine's 3×3 part; right for oblique scans too)."""
    return tuple(float(x) for x in np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)))


def evaluate_folders(pred_dir, gt_dir, labels="synapse", convention: str = "glam3d", progress: bool = False,
                     atol_mm: float = 1e-3) -> dict:
    """Per case: ``{"prediction", "truth", "shape", "spacing", "organs": {name: {"dice","hd95","status"}}}``.

    Every truth file needs a prediction of the same shape and geometry (affine within ``atol_mm``); anything
    else is a :class:`UserError` naming the case. Predictions that match no truth are listed (not scored) under
    the key ``"__unmatched__"``, present only when there are some; :func:`write_report` reports them.
    Label maps are compared in their stored array order (no resampling); spacing comes from the truth's affine."""
    convention = check_convention(convention)
    organs = resolve_labels(labels)
    pairs, unmatched = pair_cases(pred_dir, gt_dir)
    iterator = pairs
    if progress:
        from tqdm import tqdm
        iterator = tqdm(pairs, desc="evaluate", unit="case", leave=False, disable=None)  # off when not a TTY
    per_case = {}
    for case, pred_path, gt_path in iterator:
        gimg, gt = _load_labels(gt_path, case, "truth")
        pimg, pred = _load_labels(pred_path, case, "prediction")
        if pred.shape != gt.shape:
            raise UserError(f"case {case}: prediction {pred_path.name} has shape {pred.shape}, truth "
                            f"{gt_path.name} has {gt.shape}", pred_path)
        if not np.allclose(pimg.affine, gimg.affine, atol=atol_mm, rtol=0):
            worst = float(np.abs(pimg.affine - gimg.affine).max())
            raise UserError(f"case {case}: prediction {pred_path.name} and truth {gt_path.name} differ in "
                            f"geometry (affines differ by up to {worst:.4g})", pred_path)
        spacing = voxel_spacing(gimg.affine)
        per_case[case] = {
            "prediction": str(pred_path), "truth": str(gt_path), "shape": list(gt.shape),
            "spacing": list(spacing),
            "organs": case_metrics(pred, gt, organs, spacing if convention == "glam3d" else None, convention),
        }
    if unmatched:
        per_case["__unmatched__"] = [str(p) for p in unmatched]
    return per_case


# ------------------------------------------------------------------------------------------------ provenance
def code_version() -> dict:
    """``{"glam3d": __version__, "git_commit": sha or None, "git_dirty": bool or None}``.

    The commit is read only when glam3d runs from a git clone of its own (the folder above the package is the
    clone's top level): an installed wheel, or a virtual environment that happens to sit inside some other git
    repository, has no commit of glam3d to report (None)."""
    import subprocess

    from .. import __version__

    root = Path(__file__).resolve().parents[2]
    info = {"glam3d": __version__, "git_commit": None, "git_dirty": None}

    def git(*args):
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)
    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return info
        sha = git("rev-parse", "HEAD")
        if sha.returncode == 0:
            info["git_commit"] = sha.stdout.strip()
            dirty = git("status", "--porcelain", "--untracked-files=no")
            info["git_dirty"] = bool(dirty.stdout.strip()) if dirty.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def load_provenance(pred_dir) -> dict:
    """The ``predictions.json`` manifest written by ``glam3d predict`` (merging per-rank manifests of a
    multi-GPU run when the merged one is missing); ``{}`` when the predictions carry none."""
    pred_dir = Path(pred_dir)
    main = pred_dir / "predictions.json"
    try:
        if main.is_file():
            return json.loads(main.read_text())
        parts = sorted(pred_dir.glob("predictions.rank*.json"))
        if parts:
            merged = json.loads(parts[0].read_text())
            merged["cases"] = {}
            for p in parts:
                merged["cases"].update(json.loads(p.read_text()).get("cases", {}))
            return merged
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the predictions manifest ({err})", main) from None
    return {}


# ------------------------------------------------------------------------------------------------ report
def _fmt(x, scale=1.0, digits=2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * scale:.{digits}f}"


def summarize(per_case: dict, label_names: Sequence[str], convention: str) -> dict:
    """Per-organ and overall means (non-NaN values only, with counts). The overall mean of a metric is the mean
    of the organ means (the papers' "Average" column); its std is the std over cases of the per-case mean."""
    cases = {k: v for k, v in per_case.items() if not k.startswith("__")}
    per_organ = {}
    for name in label_names:
        entry = {}
        for metric in ("dice", "hd95"):
            vals = [c["organs"][name][metric] for c in cases.values() if name in c["organs"]]
            m, s, n = nan_mean_std(vals)
            entry[metric] = {"mean": m, "std": s, "n": n, "excluded": len(vals) - n}
        statuses = [c["organs"][name]["status"] for c in cases.values() if name in c["organs"]]
        entry["status_counts"] = {st: statuses.count(st) for st in ("ok", "absent", "false_positive", "missed")}
        per_organ[name] = entry
    overall = {}
    for metric in ("dice", "hd95"):
        organ_means = [per_organ[n][metric]["mean"] for n in label_names]
        m, _, n_org = nan_mean_std(organ_means)
        case_means = []
        for c in cases.values():
            v = [c["organs"][n][metric] for n in label_names if n in c["organs"]]
            cm, _, cn = nan_mean_std(v)
            case_means.append(cm if cn else float("nan"))
        _, s, n_cases = nan_mean_std(case_means)
        overall[metric] = {"mean": m, "std": s, "organs_counted": n_org, "cases_counted": n_cases}
    return {"per_organ": per_organ, "overall": overall}


def markdown_table(summary: dict) -> str:
    """Paper-ready table: organs as columns plus "Average"; rows Dice (%) and HD95, mean ± std (n if < cases)."""
    names = summary["organs"]
    unit = summary["hd95_unit"]
    ncase = summary["n_cases"]
    header = "| Metric | " + " | ".join(n.title() if n.islower() else n for n in names) + " | Average |"
    sep = "|---|" + "---:|" * (len(names) + 1)
    rows = []
    for metric, label, scale, digits in (("dice", "Dice (%)", 100.0, 2), ("hd95", f"HD95 ({unit})", 1.0, 2)):
        cells = []
        for n in names:
            e = summary["per_organ"][n][metric]
            cell = f"{_fmt(e['mean'], scale, digits)} ± {_fmt(e['std'], scale, digits)}" if e["n"] else "—"
            if e["n"] < ncase:
                cell += f" (n={e['n']})"
            cells.append(cell)
        o = summary["overall"][metric]
        avg = f"{_fmt(o['mean'], scale, digits)} ± {_fmt(o['std'], scale, digits)}" if o["organs_counted"] else "—"
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join([header, sep] + rows)


def write_report(per_case: dict, out_dir, label_names: Sequence[str], convention: str,
                 provenance: Optional[dict] = None) -> dict:
    """Write ``report.{json,csv,md,png}`` into ``out_dir`` (each atomically; nothing is written until every
    number is computed) and return the summary dict (also the body of ``report.json``)."""
    convention = check_convention(convention)
    label_names = list(label_names)
    cases = {k: v for k, v in per_case.items() if not k.startswith("__")}
    if not cases:
        raise UserError("no cases to report", out_dir)
    for case, c in cases.items():
        missing = [n for n in label_names if n not in c.get("organs", {})]
        if missing:
            raise UserError(f"case {case}: no metrics for {', '.join(missing)}", out_dir)
    stats = summarize(cases, label_names, convention)
    summary = {
        "convention": convention,
        "convention_note": CONVENTION_NOTES[convention],
        "hd95_unit": HD_UNITS[convention],
        "dice_scale": "fraction in report.json / report.csv; percent in report.md",
        "std": "sample std (ddof=1) over the counted cases; overall std: over per-case means",
        "organs": label_names,
        "n_cases": len(cases),
        **stats,
        "cases": cases,
        "unmatched_predictions": per_case.get("__unmatched__", []),
        "provenance": provenance or {},
        "evaluated_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "evaluated_with": code_version(),
    }
    csv_text = _csv(summary)
    md_text = _markdown(summary)
    png = _boxplot(summary)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "report.json", _json_safe(summary))
    _write_utf8(out_dir / "report.csv", csv_text)
    _write_utf8(out_dir / "report.md", md_text)
    with atomic_path(out_dir / "report.png") as tmp:
        tmp.write_bytes(png)
    return summary


def _write_utf8(path: Path, text: str) -> None:
    """Atomic UTF-8 text (the tables hold "±" and "—"; never the locale's encoding)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(text.encode("utf-8"))


def _json_safe(obj):
    """NaN → None (valid JSON; the counts say what was excluded)."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def _csv(summary) -> str:
    names = summary["organs"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    unit = summary["hd95_unit"]
    w.writerow(["case"] + [f"dice_{n}" for n in names] + ["dice_mean"] +
               [f"hd95_{unit}_{n}" for n in names] + [f"hd95_{unit}_mean"])

    def num(x):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"

    for case, c in summary["cases"].items():
        row = [case]
        for metric in ("dice", "hd95"):
            vals = [c["organs"][n][metric] for n in names]
            row += [num(v) for v in vals] + [num(nan_mean_std(vals)[0])]
        w.writerow(row)
    for stat in ("mean", "std", "n"):
        row = [stat]
        for metric in ("dice", "hd95"):
            row += [num(float(summary["per_organ"][n][metric][stat])) for n in names]
            o = summary["overall"][metric]
            row.append(num(float(o[stat])) if stat != "n" else num(float(o["cases_counted"])))
        w.writerow(row)
    return buf.getvalue()


def _markdown(summary) -> str:
    prov = summary["provenance"] or {}
    ck = prov.get("checkpoint", {}) if isinstance(prov.get("checkpoint"), dict) else {}
    lines = [f"# Segmentation report ({summary['n_cases']} cases)", "", markdown_table(summary), "",
             f"Convention: **{summary['convention']}**. {summary['convention_note']}", "",
             "Mean ± sample std over cases; (n=…) marks organs where fewer cases were counted.", ""]
    excluded = {n: e["status_counts"] for n, e in summary["per_organ"].items()
                if e["status_counts"]["absent"] or e["status_counts"]["false_positive"] or e["status_counts"]["missed"]}
    if excluded:
        lines.append("Edge cases (cases per organ): " + "; ".join(
            f"{n}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in c.items() if k != "ok" and v)
            for n, c in excluded.items()))
        lines.append("")
    if summary["unmatched_predictions"]:
        lines.append(f"Predictions without a truth (ignored): {len(summary['unmatched_predictions'])}")
        lines.append("")
    lines.append("## Provenance")
    if prov:
        lines.append(f"- checkpoint: {ck.get('path', '?')} (sha256 {ck.get('sha256', '?')})")
        code = prov.get("code", {})
        lines.append(f"- predicted with glam3d {code.get('glam3d', '?')}, commit {code.get('git_commit') or '?'}")
        if prov.get("inference"):
            lines.append("- inference: " + ", ".join(f"{k}={v}" for k, v in prov["inference"].items()))
        if prov.get("seed") is not None:
            lines.append(f"- seed: {prov['seed']}")
    else:
        lines.append("- the predictions carry no predictions.json manifest (not written by glam3d predict)")
    ev = summary["evaluated_with"]
    lines.append(f"- evaluated with glam3d {ev['glam3d']}, commit {ev.get('git_commit') or '?'}, "
                 f"at {summary['evaluated_at']}")
    lines.append("")
    lines.append("## Per case")
    names = summary["organs"]
    lines.append("| Case | " + " | ".join(names) + " | Mean |")
    lines.append("|---|" + "---:|" * (len(names) + 1))
    for case, c in summary["cases"].items():
        d = [c["organs"][n]["dice"] for n in names]
        lines.append(f"| {case} | " + " | ".join(_fmt(x, 100) for x in d) + f" | {_fmt(nan_mean_std(d)[0], 100)} |")
    return "\n".join(lines) + "\n"


def _boxplot(summary) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = summary["organs"]
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 0.9 * len(names) + 1.5), 7.8), dpi=110)
    for ax, metric, title, scale in ((axes[0], "dice", "Dice (%)", 100.0),
                                     (axes[1], "hd95", f"HD95 ({summary['hd95_unit']})", 1.0)):
        data = []
        for n in names:
            v = np.asarray([c["organs"][n][metric] for c in summary["cases"].values()], dtype=float) * scale
            data.append(v[~np.isnan(v)])
        pos = [i + 1 for i, d in enumerate(data) if len(d)]
        if pos:
            ax.boxplot([d for d in data if len(d)], positions=pos, widths=0.6, showmeans=True,
                       medianprops={"color": "tab:blue"}, meanprops={"marker": "^", "markerfacecolor": "tab:red",
                                                                      "markeredgecolor": "tab:red"})
            for p, d in zip(pos, [d for d in data if len(d)]):
                ax.scatter(np.full(len(d), p) + np.linspace(-0.12, 0.12, len(d)), d, s=10, alpha=0.6,
                           color="0.3", zorder=3)
        if metric == "hd95" and pos:
            allv = np.concatenate([d for d in data if len(d)])
            med = float(np.median(allv)) if allv.size else 0.0
            if allv.size and allv.max() > 20 * max(med, 1e-6) and allv.max() > 0:
                ax.set_yscale("symlog", linthresh=max(med, 1.0))  # a missed organ's penalty would flatten the rest
                ax.set_title(title + " (symlog scale)")
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_xlim(0.4, len(names) + 0.6)
        if not ax.get_title():
            ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if metric == "dice":
            ax.set_ylim(-2, 102)
    fig.suptitle(f"{summary['n_cases']} cases, convention {summary['convention']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
