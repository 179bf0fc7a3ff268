"""The documentation is current and every snippet in it runs.

- The generated reference pages (``docs/reference/cli.md``, ``config.md``) are what ``docs/generate_reference.py``
  writes now.
- README.md: at most 10 KiB; its first code block is exactly the two set-up commands (and CI runs the test one);
  its model table is ``glam3d models --markdown``; its catalogue count is the number of rows of
  ``tests/test_bad_inputs.py``.
- Every relative link of README.md and docs/**/*.md points to a file that exists.
- No project history in the tracked text files (session / round / change numbers, the machines a figure came from).
- Every ```` ```bash ```` and ```` ```python ```` block of README.md and docs/**/*.md runs, in order, each file in its
  own sandbox: a copy of the inputs :func:`docs_fixtures.build_inputs` writes once at the paths the docs use
  (phantom CTs as ``data/BTCV``, as ``$nnUNet_raw/Dataset017_BTCV`` with nnU-Net's folds in
  ``$nnUNet_preprocessed/Dataset017_BTCV/splits_final.json``, and as ``data/Task09_Spleen``; ``scans/``,
  ``pretrained/``, ``data/ade20k``, ``data/cityscapes``, ``mmseg_preds/``, ``experiments/results``). Blocks of one
  file share its sandbox, so a later block uses what an earlier one made; predict.md and evaluate.md start from the
  ``runs/`` and ``data/`` that train.md's blocks made (:data:`STARTS_FROM`). A block fails the test when it exits
  non-zero, and a ``print(...)  # (expected)`` or ``print(...)  # → expected`` line of a Python block must print
  what its comment says. Two doc files run at once, their commands on one thread each.

  What differs from a user's run is only the size of training: in the sandbox ``glam3d`` is a wrapper
  (:func:`docs_fixtures.shrunk_argv`) that appends ``--override`` items to ``glam3d train`` and ``glam3d demo``:
  one epoch of two steps, validation once on one case, no loader workers (:data:`docs_fixtures.TRAIN_SHRINK`); for
  a 3D nnFormer-family config a network of the same family under 2 M parameters on a 16x32x32 crop (a Synapse-size
  config becomes its tiny size); for a 2D config a 1.5 M-parameter network of the same family on 64x64 crops of
  small images (its ImageNet checkpoint then a made-up one of that shape); for the demo 12 phantoms at a 64
  matrix. ``torchrun`` is a wrapper that runs ``python -m torch.distributed.run`` with at most 2 processes on the
  CPU (``--standalone`` unless a rendezvous is given) and ``-m glam3d`` through the ``glam3d`` wrapper. Everything
  else runs as written: preprocessing, prediction, evaluation, postprocessing, figures, the Python API.

  A block is skipped only with a ``<!-- docs-test: skip: REASON -->`` comment right above it, and only for one of
  :data:`SKIP_REASONS` (checked against the block: a GPU block names cuda, a Slurm block ``sbatch``, a benchmark
  block a ``glam3d bench`` without ``--quick``, an allocator block ``experiments/allocators.py`` at full size,
  the set-up block is the README's first).
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import docs_fixtures as F  # noqa: E402

ROOT = F.ROOT
README = ROOT / "README.md"
DOCS = sorted([README] + list((ROOT / "docs").rglob("*.md")))
RUN_LANGS = ("bash", "python")
README_LIMIT = 10 * 1024
SETUP = ["bash scripts/demo.sh", "bash scripts/test.sh"]
BLOCK_TIMEOUT = 600

# reason -> what the skipped block must contain
SKIP_REASONS = {
    "needs a GPU": lambda b: re.search(r"--device[ =]cuda|cuda", b.code) is not None,
    "needs Slurm": lambda b: "sbatch" in b.code,
    "runs the full benchmark": lambda b: "glam3d bench" in b.code and "--quick" not in b.code,
    "runs the allocator measurement": lambda b: "experiments/allocators.py" in b.code and "--size tiny" not in b.code,
    "the README's set-up commands": lambda b: b.path == README and b.line == F.code_blocks(README)[0].line,
}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _category(reason: str):
    return next((c for c in SKIP_REASONS if reason == c or reason.startswith(c + ":")
                 or reason.startswith(c + " ")), None)


# ------------------------------------------------------------------------------------------------ reference
def test_reference_pages_are_current(capsys):
    spec = importlib.util.spec_from_file_location("_glam3d_generate_reference", ROOT / "docs" / "generate_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    rc = gen.main(["--check"])
    assert rc == 0, capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ README
def test_readme_is_a_start_page():
    text = README.read_bytes()
    assert len(text) <= README_LIMIT, f"README.md is {len(text)} bytes (limit {README_LIMIT})"
    first = F.code_blocks(README)[0]
    commands = [line.split("#")[0].strip() for line in first.code.splitlines()]
    assert [c for c in commands if c] == SETUP
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "bash scripts/test.sh" in ci


def _section(text: str, heading: str) -> str:
    m = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^#{{1,2}} |\Z)", text, re.M | re.S)
    assert m, f"README.md has no '## {heading}' section"
    return m.group(1)


def test_readme_model_table_is_glam3d_models():
    from glam3d.models.complexity import markdown_table

    section = _section(README.read_text(encoding="utf-8"), "Models")
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table == markdown_table().strip()


def test_readme_catalogue_count_is_the_rows_of_test_bad_inputs():
    spec = importlib.util.spec_from_file_location("_glam3d_docs_bad_inputs", ROOT / "tests" / "test_bad_inputs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up while they are created
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    rows = set()
    for value in vars(mod).values():  # CATALOGUE, EVALUATE_ROWS, TRAIN_ROWS, ... (name -> row builder)
        if isinstance(value, dict) and value and all(callable(f) and getattr(f, "__name__", None) == k
                                                     for k, f in value.items()):
            rows |= set(value)
    assert len(rows) > 100
    m = re.search(r"`tests/test_bad_inputs\.py` \((\d+) rows\)", README.read_text(encoding="utf-8"))
    assert m, "README.md names no catalogue row count"
    assert int(m.group(1)) == len(rows)


# ------------------------------------------------------------------------------------------------ links
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(path: Path) -> str:
    """The text of ``path`` without its fenced code blocks."""
    return re.sub(r"^```.*?^```[ \t]*$", "", path.read_text(encoding="utf-8"), flags=re.M | re.S)


def test_relative_links_point_to_files():
    broken = []
    for path in DOCS:
        for target in LINK.findall(_prose(path)):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (path.parent / target.split("#")[0]).exists():
                broken.append(f"{_rel(path)}: {target}")
    assert not broken, "broken links:\n" + "\n".join(broken)


# ------------------------------------------------------------------------------------------------ no history
# where a figure or a piece of code came from in the project's past: numbered sessions, rounds and changes, the
# machines of earlier runs. Hardware classes stated as facts about CPUs ("AMD Zen 4 and later computes bf16") are
# not history and do not match.
HISTORY = re.compile("|".join([
    r"\bchange\s+#?\d+\b",
    r"\b\d+(st|nd|rd|th)\s+(session|round)\b",
    r"\b(previous|earlier|last|this|next|later|same)\s+session\b",
    r"\bsession\s+\d+\b",
    r"\brounds?\s+of\s+work\b",
    r"\bwork\s+round\b",
    r"\b(the|our|this|that)\s+(Xeon|EPYC|Zen\s?\d|Sapphire Rapids|Cooper Lake|Ice Lake|Skylake|Genoa|Milan)"
    r"(\s+(machine|box|host|node|instance|runner))?\b(?!\s+(and later|or later|and newer|since))",
    r"\b(Xeon|EPYC|Zen\s?\d)[- ](V[M]|machine|box|host|instance)\b",
    r"\b(yester[d]ay|last\s+week|earlier\s+today)\b",
]), re.I)
MACHINE = re.compile(r"\bV[M]s?\b")  # case-sensitive: a virtual machine, not `vm` in a name
HISTORY_FILES = ("README.md", "docs/", "glam3d/", "preprocessing/", "tests/", "scripts/", "experiments/README.md",
                 "experiments/launch/", ".ci/", "setup.cfg", "pyproject.toml", "environment.yml")


def test_no_project_history_in_tracked_text():
    files = subprocess.run(["git", "ls-files", "-z", "--", *HISTORY_FILES], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    hits = []
    for name in filter(None, files):
        path = ROOT / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            for m in [*HISTORY.finditer(line), *MACHINE.finditer(line)]:
                hits.append(f"{name}:{n}: {m.group(0)!r} in {line.strip()[:120]}")
    assert not hits, "project history in tracked files (it belongs in git):\n" + "\n".join(hits)


# ------------------------------------------------------------------------------------------------ snippets
def test_every_skip_is_allowed_and_attached():
    ran = skipped = 0
    bad = []
    for path in DOCS:
        blocks = F.code_blocks(path)
        attached = {b.line for b in blocks if b.skip}
        comments = F.skip_comments(path)
        if len(comments) != len(attached):
            bad.append(f"{_rel(path)}: {len(comments)} docs-test comments, {len(attached)} right above a block")
        for b in blocks:
            if b.lang not in RUN_LANGS:
                if b.skip:
                    bad.append(f"{b.where}: skip comment on a {b.lang or 'plain'} block, which never runs")
                continue
            if b.skip is None:
                ran += 1
                continue
            skipped += 1
            cat = _category(b.skip)
            if cat is None:
                bad.append(f"{b.where}: skip reason {b.skip!r} is none of {list(SKIP_REASONS)}")
            elif not SKIP_REASONS[cat](b):
                bad.append(f"{b.where}: the block does not do what its skip reason {cat!r} says")
    print(f"docs: {ran} bash/python blocks run, {skipped} skipped")
    assert not bad, "\n".join(bad)
    first = F.code_blocks(README)[0]
    assert first.skip and _category(first.skip) == "the README's set-up commands"


@pytest.fixture(scope="session")
def docs_inputs(tmp_path_factory):
    t = time.time()
    root = F.build_inputs(tmp_path_factory.mktemp("docs_inputs") / "inputs")
    print(f"docs inputs built in {time.time() - t:.1f} s")
    return root


def _env(sandbox: Path) -> dict:
    env = dict(os.environ)
    bin_dir = F.write_wrappers(sandbox.parent / "bin")
    env["PATH"] = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), env.get("PATH", "")])
    env["nnUNet_raw"] = str(sandbox / "nnUNet_raw")
    env["nnUNet_preprocessed"] = str(sandbox / "nnUNet_preprocessed")
    env["nnUNet_results"] = str(sandbox / "nnUNet_results")
    env["MPLBACKEND"] = "Agg"
    env["PYTHONUNBUFFERED"] = "1"
    # two doc files run at once (DOC_WORKERS), one thread each: the commands are short, mostly single-threaded
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    return env


# `print(...)  # (40, 96, 96)` or `print(...)  # → text`: the output the doc promises
EXPECTED = re.compile(r"^\s*print\(.*\)\s+#\s*(→\s*(?P<text>.+?)|(?P<literal>[(\[].*?))\s*$")
# doc -> (the doc whose results it starts from, the folders of that doc's sandbox it takes): predict.md and
# evaluate.md use the runs train.md trains
STARTS_FROM = {"docs/how-to/predict.md": ("docs/how-to/train.md", ("runs", "data")),
               "docs/how-to/evaluate.md": ("docs/how-to/train.md", ("runs", "data"))}
DOC_WORKERS = 2


def _tail(text: str, n: int = 60) -> str:
    return "\n".join((text or "").splitlines()[-n:])


def _run_doc(doc: Path, inputs: Path, work: Path, before=None) -> dict:
    """Run the bash and python blocks of ``doc`` in order in a fresh sandbox under ``work``; ``before``: the result
    of the doc it starts from (its folders are copied in first). Returns ``{"ok", "error", "ran", "skipped",
    "sandbox", "seconds"}``."""
    t0 = time.time()
    sandbox = F.sandbox_copy(inputs, work / "sandbox")
    out = {"ok": False, "error": None, "ran": [], "skipped": [], "sandbox": sandbox}
    if before is not None:
        name, folders = STARTS_FROM[_rel(doc)]
        if not before["ok"]:
            out["error"] = f"{_rel(doc)} starts from {name}, which failed"
            return out
        for folder in folders:
            src = before["sandbox"] / folder
            if src.exists():
                shutil.copytree(src, sandbox / folder, dirs_exist_ok=True, symlinks=True)
    env = _env(sandbox)
    for n, block in enumerate(F.code_blocks(doc)):
        if block.lang not in RUN_LANGS:
            continue
        if block.skip:
            out["skipped"].append(f"{block.where} ({block.skip})")
            continue
        t = time.time()
        script = work / f"block{n:02d}.{'sh' if block.lang == 'bash' else 'py'}"
        script.write_text(block.code, encoding="utf-8")
        cmd = ["bash", "-eo", "pipefail", str(script)] if block.lang == "bash" else [sys.executable, str(script)]
        try:
            res = subprocess.run(cmd, cwd=sandbox, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired as err:
            out["error"] = f"{block.where}: did not finish in {BLOCK_TIMEOUT} s\n{block.code}\n{_tail(err.stderr)}"
            return out
        if res.returncode != 0:
            out["error"] = (f"{block.where}: exit {res.returncode}\n--- block\n{block.code}--- stdout (tail)\n"
                            f"{_tail(res.stdout)}\n--- stderr (tail)\n{_tail(res.stderr)}")
            return out
        for line in block.code.splitlines() if block.lang == "python" else ():
            m = EXPECTED.match(line)
            want = m and (m["text"] or m["literal"])
            if want and want not in res.stdout:
                out["error"] = f"{block.where}: expected {want!r} in the output of\n{line}\n--- stdout\n" \
                               f"{_tail(res.stdout)}"
                return out
        out["ran"].append(f"{block.where} ({time.time() - t:.1f} s)")
    out.update(ok=True, seconds=time.time() - t0)
    return out


DOCS_WITH_BLOCKS = [p for p in DOCS if any(b.lang in RUN_LANGS for b in F.code_blocks(p))]


@pytest.fixture(scope="session")
def snippet_results(request, docs_inputs, tmp_path_factory):
    """Every selected doc's blocks, run :data:`DOC_WORKERS` doc files at a time (a doc of :data:`STARTS_FROM`
    after the doc it starts from)."""
    wanted = {_rel(item.callspec.params["doc"]) for item in request.session.items
              if getattr(item, "originalname", None) == "test_snippets_run"}
    wanted |= {STARTS_FROM[d][0] for d in wanted if d in STARTS_FROM}
    docs = sorted(wanted, key=lambda d: (d in STARTS_FROM, -sum(b.code.count("glam3d train") for b in
                                                               F.code_blocks(ROOT / d))))
    futures = {}
    t = time.time()
    with ThreadPoolExecutor(DOC_WORKERS) as pool:
        def job(d):
            before = futures[STARTS_FROM[d][0]].result() if d in STARTS_FROM else None
            return _run_doc(ROOT / d, docs_inputs, tmp_path_factory.mktemp(Path(d).stem), before)
        for d in docs:  # a doc that starts from another is queued after it, so its wait never holds a free worker
            futures[d] = pool.submit(job, d)
        results = {d: f.result() for d, f in futures.items()}
    print(f"docs snippets: {len(docs)} files in {time.time() - t:.1f} s")
    return results


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS_WITH_BLOCKS, ids=_rel)
def test_snippets_run(doc, snippet_results):
    res = snippet_results[_rel(doc)]
    print(f"{_rel(doc)}: {len(res['ran'])} blocks ran, {len(res['skipped'])} skipped"
          + (f", {res['seconds']:.1f} s" if res["ok"] else ""))
    for line in res["ran"]:
        print("  ran", line)
    for line in res["skipped"]:
        print("  skipped", line)
    if not res["ok"]:
        pytest.fail(res["error"], pytrace=False)
