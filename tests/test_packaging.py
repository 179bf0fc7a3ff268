"""Packaging: the wheel ships what the commands read (the configs), installs into a fresh environment and runs
``glam3d configs`` and ``glam3d demo`` from an empty folder; the core runs without the optional einops;
``environment.yml`` parses and names the same dependencies as ``setup.cfg``."""
from __future__ import annotations

import configparser
import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
#: conda package name -> PyPI distribution name, where they differ
CONDA_TO_PYPI = {"pytorch": "torch"}
#: conda entries that are the environment itself, not a glam3d dependency
CONDA_ONLY = {"python", "pip", "pytorch-cuda"}


def _requirement(spec: str) -> tuple:
    """``"numpy>=1.23"`` -> ``("numpy", ">=1.23")``: a normalised name (PEP 503) and its version specifier."""
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*(.*?)\s*", spec)
    assert m, spec
    return re.sub(r"[-_.]+", "-", m.group(1)).lower(), m.group(3).replace(" ", "")


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _lines(value: str) -> list:
    return [ln.strip() for ln in value.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_environment_yml_matches_setup_cfg():
    """Every install_requires entry is in environment.yml with the same version bound (conda or pip section);
    nothing else is, besides the interpreter, pip, the CUDA runtime and glam3d itself with extras setup.cfg
    declares."""
    cfg = _setup_cfg()
    required = dict(_requirement(s) for s in _lines(cfg["options"]["install_requires"]))
    extras = set(cfg["options.extras_require"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "glam3d" and env["channels"]
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    named = {}
    for spec in conda:
        name, bound = _requirement(spec.replace("=", "==", 1) if re.fullmatch(r"[\w.-]+=[^=<>]+", spec) else spec)
        if name not in CONDA_ONLY:
            named[CONDA_TO_PYPI.get(name, name)] = bound
    self_install = [s for s in pip if s.startswith("-e ")]
    for spec in pip:
        if not spec.startswith("-e "):
            named.__setitem__(*_requirement(spec))
    assert named == required
    assert len(self_install) == 1
    m = re.fullmatch(r"-e \.(?:\[([\w,-]+)\])?", self_install[0])
    assert m and set((m.group(1) or "").split(",")) - {""} <= extras


def test_einops_is_an_extra_and_the_core_runs_without_it(tmp_path):
    """einops is only the SwinUNETR baseline's: not in install_requires but in the ``swinunetr`` extra; with it
    missing the GLAM networks build and run, ``glam3d models`` lists the baseline as not available with the
    command that installs it, and building it says so in one line (a UserError when a config asks for it)."""
    cfg = _setup_cfg()
    assert "einops" not in {_requirement(s)[0] for s in _lines(cfg["options"]["install_requires"])}
    assert [_requirement(s)[0] for s in _lines(cfg["options.extras_require"]["swinunetr"])] == ["einops"]
    code = textwrap.dedent("""
        import io, json, sys
        from contextlib import redirect_stdout
        sys.modules["einops"] = None   # as if it were not installed
        import torch
        from glam3d.cli import main
        from glam3d.config import config_from_dict
        from glam3d.engine.train import build_network
        from glam3d.errors import UserError
        from glam3d.models import build_model
        m = build_model("glam_nnformer_tiny").eval()
        with torch.no_grad():
            out = m(torch.zeros(1, 1, *m.default_crop))
        try:
            build_model("swin_unetr_tiny")
            built = "built"
        except ImportError as err:
            built = str(err)
        try:
            build_network(config_from_dict({"model": {"name": "swin_unetr_tiny"}}).model, 9, 1)
            user = "built"
        except UserError as err:
            user = str(err)
        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = main(["models"])
        print(json.dumps({"shape": list(out.shape), "built": built, "user": user, "rc": rc,
                          "table": buf.getvalue(), "einops": sys.modules.get("einops") is not None}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    hint = "pip install 'glam3d[swinunetr]'"
    assert r["shape"][:2] == [1, 9] and not r["einops"]
    assert hint in r["built"] and "\n" not in r["built"]
    assert r["user"].startswith("config key 'model': cannot build 'swin_unetr_tiny'") and hint in r["user"]
    assert r["rc"] == 0
    rows = {ln.split()[0]: ln for ln in r["table"].splitlines()[2:]}
    assert "not available" in rows["swin_unetr_tiny"] and hint in rows["swin_unetr_tiny"]
    assert "not available" not in rows["glam_nnformer_tiny"] and "not available" not in rows["nnformer_synapse"]


# ------------------------------------------------------------------------------------------------ the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this source tree, built from a copy of it (the build leaves nothing in the work tree), with the
    project environment's setuptools (no index needed)."""
    import shutil

    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    for name in ("glam3d", "preprocessing"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("glam3d-*.whl")
    return whl


@pytest.mark.slow
def test_wheel_ships_the_configs_and_declares_the_extras(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.name for p in (ROOT / "glam3d" / "configs").glob("*.yaml")}
    assert "phantom_glam_nnformer_tiny.yaml" in shipped
    assert {n.split("/")[-1] for n in names if n.startswith("glam3d/configs/")} == shipped
    assert not [n for n in names if n.endswith((".cpp", ".c", ".h"))]  # nothing is compiled at run time
    for module in ("glam3d/__init__.py", "glam3d/inference/predictor.py", "glam3d/utils/ooc.py",
                   "glam3d/engine/tasks.py", "preprocessing/pipeline.py"):
        assert module in names, module
    assert not any(n.startswith(("tests/", "experiments/", "docs/")) for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    requires = re.findall(r"^Requires-Dist: (.*)$", meta, re.M)
    assert not any(r.startswith("einops") and "extra ==" not in r for r in requires)
    assert {"swinunetr", "tensorboard", "test"} <= set(re.findall(r"^Provides-Extra: (.*)$", meta, re.M))
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
    assert b"glam3d = glam3d.cli:main" in entry and b"glam3d-preprocess = preprocessing.cli:main" in entry


@pytest.mark.slow
def test_installed_wheel_runs_configs_and_demo_from_an_empty_folder(wheel, tmp_path):
    """``pip install`` of the wheel (not editable) into a fresh virtual environment that borrows this one's
    installed dependencies (torch, MONAI, ...) but not its glam3d; then, from an empty folder and with no
    PYTHONPATH, ``glam3d configs`` lists the shipped configs and a shortened ``glam3d demo`` runs end to end. The
    environment sits inside an unrelated git repository: the predictions manifest reports no glam3d commit."""
    git_env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@example.org"}
    outer = tmp_path / "other_repo"
    outer.mkdir()
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "unrelated"]):
        subprocess.run(cmd, cwd=outer, env=git_env, check=True, capture_output=True)
    venv = outer / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # the project environment's packages, on the path after the new environment's own (its .pth files, among them
    # the editable glam3d, are not read: only a site directory's are)
    Path(purelib, "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                          "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")

    def run(*args, timeout=900):
        return subprocess.run([str(a) for a in args], cwd=empty, env=env, capture_output=True, text=True,
                              timeout=timeout)

    where = run(py, "-c", "import glam3d, preprocessing; print(glam3d.__file__); print(preprocessing.__file__)")
    assert where.returncode == 0, where.stderr[-2000:]
    assert all(Path(p).is_relative_to(venv) for p in where.stdout.split()), where.stdout
    configs = run(venv / "bin" / "glam3d", "configs")
    assert configs.returncode == 0, configs.stderr[-2000:]
    assert "phantom_glam_nnformer_tiny" in configs.stdout and "synapse_glam_nnformer" in configs.stdout
    demo = run(venv / "bin" / "glam3d", "demo", "--out", "demo", "--cases", "8", "--matrix", "64", "--workers", "1",
               "--override", "train.epochs=1", "--override", "train.iters_per_epoch=2",
               "--override", "val.max_cases=1", "--override", "val.overlap=0.25")
    assert demo.returncode == 0, (demo.stdout[-2000:], demo.stderr[-3000:])
    assert "== demo summary ==" in demo.stdout and "mean Dice over the 8 Synapse organs" in demo.stdout
    assert (empty / "demo" / "report" / "report.json").is_file()
    man = json.loads((empty / "demo" / "predictions" / "predictions.json").read_text())
    assert man["code"] == {"glam3d": "0.1.0", "git_commit": None, "git_dirty": None}
    assert sorted(p.name for p in empty.iterdir()) == ["demo"]  # nothing written outside --out
