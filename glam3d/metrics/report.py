"""Evaluation reports: per-case, per-organ Dice / HD95 / NSD of prediction folders against their truths.

``evaluate_folders(pred_dirs, gt, labels, convention) -> per_case`` (:mod:`glam3d.metrics.evaluation`) reads and
checks the pairs; ``write_report(per_case, out_dir, label_names, convention, provenance) -> summary`` writes
``report.json``, ``report.csv``, ``report.md`` (paper table: organs as columns, mean ± std), ``report.png`` (box
plots) and ``summary.json`` (nnU-Net v2's schema). Several prediction folders (cross-validation folds) give one
report over all their cases with per-fold means.

Example::

    per_case = evaluate_folders(["run/fold_0/validation", "run/fold_1/validation"], "nnUNet_raw/Dataset017/labelsTr",
                                "nnUNet_raw/Dataset017/dataset.json")
    summary = write_report(per_case, "report/", [n for n, _ in resolve_labels("synapse")], "glam3d",
                           provenance=load_provenance("preds/"))
"""
from __future__ import annotations

import csv
import datetime as _dt
import io
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import UserError
from ..utils.io import atomic_path, atomic_write_json
from .evaluation import evaluate_folders, voxel_spacing  # noqa: F401  (the report's entry points live here too)
from .labels import SYNAPSE_ORGANS, _name_key, labels_from_dataset, load_label_set, resolve_labels  # noqa: F401
from .layouts import case_key  # noqa: F401
from .provenance import load_provenance  # noqa: F401
from .segmentation import CONVENTION_NOTES, HD_UNITS, check_convention, nan_mean_std

REPORT_FILES = ("report.json", "report.csv", "report.md", "report.png", "summary.json")
METRICS = ("dice", "hd95", "nsd")


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


# ------------------------------------------------------------------------------------------------ report
def _fmt(x, scale=1.0, digits=2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * scale:.{digits}f}"


def _metrics_of(cases: dict) -> list[str]:
    """The metrics every case carries (NSD only where it was computed)."""
    present = list(METRICS)
    for c in cases.values():
        for o in c["organs"].values():
            present = [m for m in present if m in o]
    return present


def summarize(per_case: dict, label_names: Sequence[str], convention: str) -> dict:
    """Per-organ and overall means (non-NaN values only, with counts). The overall mean of a metric is the mean
    of the organ means (the papers' "Average" column); its std is the std over cases of the per-case mean."""
    cases = {k: v for k, v in per_case.items() if not k.startswith("__")}
    metrics = _metrics_of(cases)
    per_organ = {}
    for name in label_names:
        entry = {}
        for metric in metrics:
            vals = [c["organs"][name][metric] for c in cases.values() if name in c["organs"]]
            m, s, n = nan_mean_std(vals)
            entry[metric] = {"mean": m, "std": s, "n": n, "excluded": len(vals) - n}
        statuses = [c["organs"][name]["status"] for c in cases.values() if name in c["organs"]]
        entry["status_counts"] = {st: statuses.count(st) for st in ("ok", "absent", "false_positive", "missed")}
        per_organ[name] = entry
    overall = {}
    for metric in metrics:
        organ_means = [per_organ[n][metric]["mean"] for n in label_names]
        m, _, n_org = nan_mean_std(organ_means)
        case_means = []
        for c in cases.values():
            v = [c["organs"][n][metric] for n in label_names if n in c["organs"]]
            cm, _, cn = nan_mean_std(v)
            case_means.append(cm if cn else float("nan"))
        _, s, n_cases = nan_mean_std(case_means)
        overall[metric] = {"mean": m, "std": s, "organs_counted": n_org, "cases_counted": n_cases}
    return {"metrics": metrics, "per_organ": per_organ, "overall": overall}


def fold_means(cases: dict, label_names: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """Per prediction folder (fold): its cases, the per-organ mean of each metric and the mean of those."""
    folds: dict = {}
    for cid, c in cases.items():
        folds.setdefault(c.get("fold", ""), {})[cid] = c
    out = []
    for folder, fc in folds.items():
        s = summarize(fc, label_names, "glam3d")
        out.append({"pred_dir": folder, "n_cases": len(fc), "cases": list(fc),
                    "per_organ": {m: {n: s["per_organ"][n][m]["mean"] for n in label_names} for m in metrics},
                    "overall": {m: s["overall"][m]["mean"] for m in metrics}})
    return out


def _metric_rows(summary):
    unit = summary["hd95_unit"]
    rows = [("dice", "Dice (%)", 100.0), ("hd95", f"HD95 ({unit})", 1.0)]
    if "nsd" in summary.get("metrics", ()):
        rows.append(("nsd", "NSD (%)", 100.0))
    return rows


def _title(n: str) -> str:
    return n.title() if n.islower() else n


def markdown_table(summary: dict) -> str:
    """Paper-ready table: organs as columns plus "Average"; rows Dice (%), HD95 and NSD (%), mean ± std (n if fewer
    cases were counted)."""
    names = summary["organs"]
    ncase = summary["n_cases"]
    header = "| Metric | " + " | ".join(_title(n) for n in names) + " | Average |"
    sep = "|---|" + "---:|" * (len(names) + 1)
    rows = []
    for metric, label, scale in _metric_rows(summary):
        cells = []
        for n in names:
            e = summary["per_organ"][n][metric]
            cell = f"{_fmt(e['mean'], scale)} ± {_fmt(e['std'], scale)}" if e["n"] else "—"
            if e["n"] < ncase:
                cell += f" (n={e['n']})"
            cells.append(cell)
        o = summary["overall"][metric]
        avg = f"{_fmt(o['mean'], scale)} ± {_fmt(o['std'], scale)}" if o["organs_counted"] else "—"
        rows.append(f"| {label} | " + " | ".join(cells) + f" | {avg} |")
    return "\n".join([header, sep] + rows)


def _nnunet_cases(cases: dict, label_names, values) -> dict:
    out = {}
    for cid, c in cases.items():
        counts = {}
        for n, v in zip(label_names, values):
            o = c["organs"][n]
            if "n_pred" not in o:
                return {}
            counts[v] = (o["n_pred"], o["n_ref"], o["tp"])
        out[cid] = {"prediction": c.get("prediction"), "truth": c.get("truth"), "counts": counts,
                    "n_voxels": c.get("n_voxels", int(np.prod(c.get("shape") or [0])))}
    return out


def write_report(per_case: dict, out_dir, label_names: Sequence[str], convention: str,
                 provenance: Optional[dict] = None, *, checkpoints: Optional[list] = None,
                 case_provenance: Optional[dict] = None, postprocessing: Optional[dict] = None,
                 evaluation: Optional[dict] = None) -> dict:
    """Write ``report.{json,csv,md,png}`` and ``summary.json`` into ``out_dir`` (each atomically; nothing is written
    until every number is computed) and return the summary dict (the body of ``report.json``).

    ``provenance``: the predictions' manifest (one folder) or ``{"manifests": {folder: manifest}}``;
    ``checkpoints`` / ``case_provenance``: :func:`glam3d.metrics.provenance.attribute`'s two results;
    ``postprocessing``: a decision of :func:`glam3d.postprocessing.decide_postprocessing` (the report says per
    organ whether it helped); ``evaluation``: what was evaluated and how (folders, options)."""
    from .nnunet_summary import nnunet_summary

    convention = check_convention(convention)
    label_names = list(label_names)
    cases = {k: v for k, v in per_case.items() if not k.startswith("__")}
    if not cases:
        raise UserError("no cases to report", out_dir)
    for case, c in cases.items():
        missing = [n for n in label_names if n not in c.get("organs", {})]
        if missing:
            raise UserError(f"case {case}: no metrics for {', '.join(missing)}", out_dir)
    for cid, info in (case_provenance or {}).items():
        if cid in cases:
            cases[cid]["provenance"] = info
    stats = summarize(cases, label_names, convention)
    pred_dirs = per_case.get("__pred_dirs__") or sorted({c.get("fold", "") for c in cases.values()})
    left_out = per_case.get("__left_out__", [])
    summary = {
        "convention": convention,
        "convention_note": CONVENTION_NOTES[convention],
        "hd95_unit": HD_UNITS[convention],
        "dice_scale": "fraction in report.json / report.csv; percent in report.md",
        "std": "sample std (ddof=1) over the counted cases; overall std: over per-case means",
        "organs": label_names,
        "n_cases": len(cases),
        **stats,
        "nsd_tolerance_mm": per_case.get("__nsd_tolerance_mm__"),
        "pred_dirs": pred_dirs,
        "gt": per_case.get("__gt__"),
        "labels": per_case.get("__label_set__"),
        "folds": fold_means(cases, label_names, stats["metrics"]) if len(pred_dirs) > 1 else [],
        "truths_left_out": {"count": len(left_out), "cases": left_out},
        "warnings": list(per_case.get("__warnings__", [])),
        "cases": cases,
        "unmatched_predictions": per_case.get("__unmatched__", []),
        "checkpoints": checkpoints or [],
        "postprocessing": postprocessing,
        "evaluation": evaluation or {},
        "provenance": provenance or {},
        "evaluated_at": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "evaluated_with": code_version(),
    }
    lab = per_case.get("__label_set__") or {}
    values = [v for n, v in (lab.get("organs") or [])] if lab.get("organs") else []
    nn_cases = _nnunet_cases(cases, label_names, values) if len(values) == len(label_names) else {}
    nn_summary = nnunet_summary(nn_cases, values) if nn_cases else None
    csv_text = _csv(summary)
    md_text = _markdown(summary)
    png = _boxplot(summary)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "report.json", _json_safe(summary))
    if nn_summary is not None:
        atomic_write_json(out_dir / "summary.json", _json_safe(nn_summary))
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
    prefix = {"dice": "dice", "hd95": f"hd95_{unit}", "nsd": "nsd"}
    metrics = summary["metrics"]
    folds = bool(summary["folds"])
    head = ["case"]
    for m in metrics:
        head += [f"{prefix[m]}_{n}" for n in names] + [f"{prefix[m]}_mean"]
    w.writerow(head + (["fold"] if folds else []))

    def num(x):
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"

    for case, c in summary["cases"].items():
        row = [case]
        for metric in metrics:
            vals = [c["organs"][n][metric] for n in names]
            row += [num(v) for v in vals] + [num(nan_mean_std(vals)[0])]
        w.writerow(row + ([c.get("fold", "")] if folds else []))
    for stat in ("mean", "std", "n"):
        row = [stat]
        for metric in metrics:
            row += [num(float(summary["per_organ"][n][metric][stat])) for n in names]
            o = summary["overall"][metric]
            row.append(num(float(o[stat])) if stat != "n" else num(float(o["cases_counted"])))
        w.writerow(row + ([""] if folds else []))
    return buf.getvalue()


def _short(sha) -> str:
    return "unknown" if not sha else str(sha)[:12]


def _case_list(cases: list, limit: int = 40) -> str:
    return ", ".join(cases[:limit]) + (f", … ({len(cases)} cases)" if len(cases) > limit else "")


def _provenance_lines(summary) -> list[str]:
    lines = []
    cks = summary.get("checkpoints") or []
    prov = summary["provenance"] or {}
    if cks:
        n = sum(1 for c in cks if c["sha256"])
        lines.append(f"- {n} checkpoint{'s' if n != 1 else ''} made the scored predictions:")
        for c in cks:
            if c["sha256"] is None:
                lines.append(f"  - **unknown checkpoint** (no manifest entry names one): {len(c['cases'])} case(s): "
                             f"{_case_list(c['cases'])}")
                continue
            paths = ", ".join(c["paths"]) or "path not recorded"
            note = (f" (from the manifest's top level for {len(c['from_top_level'])} case(s) whose entry names no "
                    f"checkpoint)") if c["from_top_level"] else ""
            lines.append(f"  - {paths} (sha256 {c['sha256']}): {len(c['cases'])} case(s){note}: "
                         f"{_case_list(c['cases'])}")
    elif isinstance(prov.get("checkpoint"), dict):  # a manifest passed without per-case attribution
        ck = prov["checkpoint"]
        lines.append(f"- checkpoint (the manifest's top level): {ck.get('path', '?')} (sha256 {ck.get('sha256', '?')})")
    elif not prov:
        lines.append("- the predictions carry no predictions.json manifest (not written by glam3d predict)")
    manifests = prov.get("manifests") if "manifests" in prov else ({"": prov} if prov else {})
    for folder, man in manifests.items():
        if not man:
            continue
        code = man.get("code", {}) or {}
        where = f" ({folder})" if folder else ""
        lines.append(f"- predicted{where} with glam3d {code.get('glam3d', '?')}, "
                     f"commit {code.get('git_commit') or '?'}")
        if man.get("inference"):
            lines.append("  - inference: " + ", ".join(f"{k}={v}" for k, v in man["inference"].items()))
        if man.get("seed") is not None:
            lines.append(f"  - seed: {man['seed']}")
    return lines


def _markdown(summary) -> str:
    names = summary["organs"]
    lines = [f"# Segmentation report ({summary['n_cases']} cases)", "", markdown_table(summary), "",
             f"Convention: **{summary['convention']}**. {summary['convention_note']}", "",
             "Mean ± sample std over cases; (n=…) marks organs where fewer cases were counted.", ""]
    tol = summary.get("nsd_tolerance_mm")
    if tol:
        lines += ["NSD: normalised surface Dice (MONAI compute_surface_dice, distances in mm) at the tolerances "
                  + ", ".join(f"{n} {tol[n]:g} mm" for n in names) + ".", ""]
    excluded = {n: e["status_counts"] for n, e in summary["per_organ"].items()
                if e["status_counts"]["absent"] or e["status_counts"]["false_positive"] or e["status_counts"]["missed"]}
    if excluded:
        lines.append("Edge cases (cases per organ): " + "; ".join(
            f"{n}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in c.items() if k != "ok" and v)
            for n, c in excluded.items()))
        lines.append("")
    lo = summary["truths_left_out"]
    if lo["count"]:
        lines.append(f"Truths left out (no prediction, --only-predicted): {lo['count']}: "
                     + _case_list([e["case"] for e in lo["cases"]]))
        lines.append("")
    if summary["unmatched_predictions"]:
        lines.append(f"Predictions without a truth (ignored): {len(summary['unmatched_predictions'])}")
        lines.append("")
    if summary["warnings"]:
        lines.append("## Warnings")
        lines += [f"- {w}" for w in summary["warnings"]]
        lines.append("")
    if summary["folds"]:
        lines.append("## Folds (mean Dice % per organ)")
        lines.append("| Fold | Cases | " + " | ".join(_title(n) for n in names) + " | Mean |")
        lines.append("|---|---:|" + "---:|" * (len(names) + 1))
        for f in summary["folds"]:
            d = f["per_organ"]["dice"]
            lines.append(f"| {f['pred_dir']} | {f['n_cases']} | " + " | ".join(_fmt(d[n], 100) for n in names)
                         + f" | {_fmt(f['overall']['dice'], 100)} |")
        lines.append("")
    pp = summary.get("postprocessing")
    if pp:
        lines += _postprocessing_lines(pp)
    lines.append("## Provenance")
    lines += _provenance_lines(summary)
    ev = summary["evaluated_with"]
    lines.append(f"- evaluated with glam3d {ev['glam3d']}, commit {ev.get('git_commit') or '?'}, "
                 f"at {summary['evaluated_at']}")
    lines.append("")
    lines.append("## Per case (Dice %)")
    lines.append("| Case | " + " | ".join(names) + " | Mean |")
    lines.append("|---|" + "---:|" * (len(names) + 1))
    for case, c in summary["cases"].items():
        d = [c["organs"][n]["dice"] for n in names]
        lines.append(f"| {case} | " + " | ".join(_fmt(x, 100) for x in d) + f" | {_fmt(nan_mean_std(d)[0], 100)} |")
    return "\n".join(lines) + "\n"


def _postprocessing_lines(pp: dict) -> list[str]:
    fg = pp["foreground_largest_component"]
    lines = ["## Postprocessing (keep the largest connected component)", "",
             f"Decided on these {pp['cases']} cases as nnU-Net does: {pp['rule']}", "",
             f"- all foreground as one: {'kept' if fg['apply'] else 'not kept'} (mean Dice "
             f"{_fmt(fg['mean_dice_without'], 100)} → {_fmt(fg['mean_dice_with'], 100)}"
             + (f"; worse for {', '.join(fg['classes_worse'])}" if fg["classes_worse"] else "") + ")", "",
             "| Organ | Dice without | Dice with | Helped | Kept |", "|---|---:|---:|---|---|"]
    for e in pp["per_class"]:
        a, b = e["dice_without"], e["dice_with"]
        helped = "—" if any(isinstance(x, float) and math.isnan(x) for x in (a, b)) or a is None or b is None \
            else ("yes" if b > a else "no" if b < a else "no change")
        lines.append(f"| {e['name']} | {_fmt(a, 100)} | {_fmt(b, 100)} | {helped} | {'yes' if e['apply'] else 'no'} |")
    md = pp["mean_dice"]
    lines += ["", f"Mean Dice without postprocessing {_fmt(md['without'], 100)}, with the kept steps "
                  f"{_fmt(md['with'], 100)}.", ""]
    return lines


def _boxplot(summary) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = summary["organs"]
    rows = _metric_rows(summary)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(7.0, 0.9 * len(names) + 1.5), 3.9 * len(rows)), dpi=110)
    for ax, (metric, title, scale) in zip(np.atleast_1d(axes), rows):
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
        if metric == "nsd" and summary.get("nsd_tolerance_mm"):
            tol = summary["nsd_tolerance_mm"]
            vals = sorted({tol[n] for n in names})
            ax.set_title(title + (f" at {vals[0]:g} mm" if len(vals) == 1 else " at per-organ tolerances"))
        ax.set_xticks(range(1, len(names) + 1))
        ax.set_xticklabels(names, rotation=30, ha="right")
        ax.set_xlim(0.4, len(names) + 0.6)
        if not ax.get_title():
            ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if metric in ("dice", "nsd"):
            ax.set_ylim(-2, 102)
    fig.suptitle(f"{summary['n_cases']} cases, convention {summary['convention']}", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
