"""CPU allocators beside each other on glam3d's inference workloads: one run, counterbalanced, a fresh process each.

Arms (what a user sets in the environment of a ``glam3d`` command; every other allocator variable is cleared):

* ``stock``: nothing set (PyTorch's CPU allocator on glibc's malloc, dynamic mmap threshold);
* ``glibc-memory``: ``GLAM3D_ALLOC_TUNING=memory`` (:mod:`glam3d.alloc`'s profile: a fixed glibc mmap threshold
  of 1 MiB + transparent huge pages);
* ``jemalloc``: ``LD_PRELOAD=libjemalloc.so.2`` with the ``MALLOC_CONF`` that PyTorch's CPU launcher
  (``torch.backends.xeon.run_cpu --enable-jemalloc``) sets;
* ``tcmalloc``: ``LD_PRELOAD=libtcmalloc_minimal.so.4`` (``run_cpu``'s default allocator; it sets nothing else).

An arm whose library is not installed (Debian / Ubuntu: ``apt-get install libjemalloc2 libtcmalloc-minimal4``) is
left out with one line saying why. ``experiments/results/allocators-*.md`` also holds two arms glam3d no longer
has (a glibc profile with a 32 MiB threshold and no heap trimming, and a C++ caching CPU allocator): neither beat
the best library allocator beyond the spread, so neither was kept (``docs/performance.md``).

Workloads (``--size full``; ``tiny`` is the same with the tiny networks and small volumes, to try the script):

* ``forward_glam`` / ``forward_nnformer``: the Synapse-size GLAM-nnFormer / nnFormer on one 64x128x128 crop,
  ``torch.inference_mode``, one untimed forward then ``--repeats`` timed ones (the time is their median; the
  first, cold forward is recorded too);
* ``sw``: :func:`glam3d.inference.sliding_window.predict_volume` of GLAM-nnFormer over a 96x128x256 float32 volume
  in memory (overlap 0.5, Gaussian, 2 windows per forward: 6 windows), measured cold as ``glam3d bench``'s
  sliding-window lines;
* ``long_ct``: nnFormer over a 256x128x256 int16 CT streamed disk to disk (``.npy`` in, labels ``.npy`` out,
  overlap 0, one window per forward: 4 slabs of 2 windows), as ``glam3d bench``'s long-CT lines.

The volumes are smaller than ``glam3d bench``'s (128x256x256, 512x512x200) so that 4 rounds of 4 arms take about
25 minutes on 2 cores; every window is a full 64x128x128 crop of the Synapse-size networks, so the allocator sees
the same requests per forward.

Order: in each round the workloads run one after the other and, for each workload, every arm in its own fresh
interpreter; odd rounds reverse both orders (ABCDEF FEDCBA ...), so drift of a shared machine falls on every arm
alike. Each process reports the workload's seconds, its peak RSS (``VmHWM``: torch, the network and the
workload), page faults and system CPU time; the parent records the load average and the CPU time that other
processes used while it ran (``/proc/stat`` busy time minus the child's own). On a shared machine a process during
which others used more than ``--max-busy`` (10 %) of the CPUs' time is run again, in its place in the order, once
the CPUs are idle (at most ``--retries`` times); the result keeps every attempt and summarises the last.

Summary per arm and workload: median seconds over the rounds, their min-max and interquartile range, the ratio
to ``stock`` (median of the per-round ratios, each arm against the stock process of the same round and workload,
and their min-max), and the median peak RSS. Written to ``OUT/allocators-<setup>.json`` and ``.md`` (the setup
named as ``glam3d bench`` names it), rewritten after every process so that a cut run keeps what it measured.

Usage::

    python experiments/allocators.py --wait-quiet 0.5      # full size, 4 rounds, ~35 min on 2 cores
    python experiments/allocators.py --size tiny --rounds 2 --out /tmp/alloc   # the script itself, ~2 min
    python experiments/allocators.py --report experiments/results/allocators-<setup>.json   # table again
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing glam3d
    sys.path.insert(0, ROOT)

from glam3d.alloc import preloaded_allocator, tune_from_environment  # noqa: E402  (no torch import)

#: the MALLOC_CONF that ``torch.backends.xeon.run_cpu --enable-jemalloc`` sets
RUN_CPU_JEMALLOC_CONF = "oversize_threshold:1,background_thread:true,metadata_thp:auto"
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")

#: arm -> (environment it sets, library it preloads or None)
ARMS: Dict[str, tuple] = {
    "stock": ({}, None),
    "glibc-memory": ({"GLAM3D_ALLOC_TUNING": "memory"}, None),
    "jemalloc": ({"MALLOC_CONF": RUN_CPU_JEMALLOC_CONF}, "libjemalloc.so.2"),
    "tcmalloc": ({}, "libtcmalloc_minimal.so.4"),
}
#: arms that are an allocator library (the bar a glam3d profile has to clear to be worth its settings)
LIBRARY_ARMS = ("stock", "jemalloc", "tcmalloc")
#: environment variables an arm may set; all of them are cleared before an arm's own are applied
ALLOCATOR_ENV = ("GLAM3D_ALLOC", "MALLOC_", "THP_MEM", "LD_PRELOAD", "TCMALLOC_")

WORKLOADS = ("forward_glam", "forward_nnformer", "sw", "long_ct")
SIZES = {
    "full": {"forward_glam": {"model": "glam_nnformer_synapse"},
             "forward_nnformer": {"model": "nnformer_synapse"},
             "sw": {"model": "glam_nnformer_synapse", "volume": [96, 128, 256], "overlap": 0.5, "sw_batch_size": 2},
             "long_ct": {"model": "nnformer_synapse", "volume": [256, 128, 256], "overlap": 0.0,
                         "sw_batch_size": 1}},
    "tiny": {"forward_glam": {"model": "glam_nnformer_tiny"},
             "forward_nnformer": {"model": "nnformer_tiny"},
             "sw": {"model": "glam_nnformer_tiny", "volume": [48, 96, 96], "overlap": 0.5, "sw_batch_size": 2},
             "long_ct": {"model": "nnformer_tiny", "volume": [96, 128, 128], "overlap": 0.0, "sw_batch_size": 1}},
}


# ---------------------------------------------------------------------------------------------------------------
# the child: one workload under one arm
# ---------------------------------------------------------------------------------------------------------------
def _proc_status(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes (0 where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _worker(spec: dict) -> dict:
    """Run ``spec["workload"]`` once in this (fresh) process; returns its measurements."""
    import resource

    state = tune_from_environment()  # what a glam3d command does first, before torch is imported
    import torch

    from glam3d import bench

    torch.set_num_threads(spec["threads"])
    out = {"arm": spec["arm"], "workload": spec["workload"], "round": spec["round"],
           "glam3d_profile": (state or {}).get("profile"), "preloaded": preloaded_allocator()}
    if ARMS[spec["arm"]][1] is not None and out["preloaded"] != spec["arm"]:
        out["error"] = f"LD_PRELOAD did not load {ARMS[spec['arm']][1]}"
        return out
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    w = spec["params"]
    if spec["workload"].startswith("forward_"):
        model = bench._build(w["model"], "cpu")
        x = torch.randn(1, model.in_channels, *model.default_crop)
        times = []
        with torch.inference_mode():
            for _ in range(spec["repeats"] + 1):
                t = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t)
        out.update(seconds=statistics.median(times[1:]), cold_seconds=times[0], times=times[1:],
                   peak_rss=bench._peak_rss())
    else:
        child = {"model": w["model"], "device": "cpu", "threads": spec["threads"], "volume": w["volume"],
                 "overlap": w["overlap"], "sw_batch_size": w["sw_batch_size"], "amp": False,
                 "long_ct": spec["workload"] == "long_ct", "tmpdir": spec.get("tmpdir")}
        r = bench._worker(child)
        out.update(seconds=r["seconds"], peak_rss=r["peak_rss"], rss_before=r["rss_before"], windows=r.get("windows"))
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    out.update(minor_faults=r1.ru_minflt - r0.ru_minflt, sys_seconds=r1.ru_stime - r0.ru_stime,
               user_seconds=r1.ru_utime - r0.ru_utime)
    return out


# ---------------------------------------------------------------------------------------------------------------
# the parent: arms, order, machine load
# ---------------------------------------------------------------------------------------------------------------
def find_library(name: str) -> Optional[str]:
    """The first ``LIB_DIRS/name`` that exists."""
    for d in LIB_DIRS:
        p = os.path.join(d, name)
        if os.path.exists(p):
            return p
    return None


def arm_environment(arm: str, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of an arm's child: ``base`` (default this process's) without any allocator variable, plus
    the arm's own. Raises ``LookupError`` (one line) when the arm's library is not installed or its glam3d profile
    does not exist."""
    from glam3d.alloc import PROFILES

    env, lib = ARMS[arm]
    full = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(ALLOCATOR_ENV)}
    full.update(env)
    if lib is not None:
        path = find_library(lib)
        if path is None:
            raise LookupError(f"{lib} not found in {', '.join(LIB_DIRS)}")
        full["LD_PRELOAD"] = path
    profile = env.get("GLAM3D_ALLOC_TUNING")
    if profile is not None and profile not in PROFILES:
        raise LookupError(f"GLAM3D_ALLOC_TUNING={profile} is not a profile of this glam3d")
    return full


def schedule(arms: Sequence[str], workloads: Sequence[str], rounds: int) -> List[tuple]:
    """``(round, workload, arm)`` in run order: per round every workload, per workload every arm; odd rounds
    reverse both orders (counterbalanced: no arm always runs right after the same one)."""
    out = []
    for r in range(rounds):
        ws, arms_r = (list(workloads), list(arms)) if r % 2 == 0 else (list(workloads)[::-1], list(arms)[::-1])
        out += [(r, w, a) for w in ws for a in arms_r]
    return out


def _cpu_busy_seconds() -> tuple:
    """(busy, steal) CPU seconds of the whole machine since boot, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (v + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / hz, steal / hz


def wait_until_quiet(threshold: float, minutes: int = 3, max_hours: float = 3.0, log=print) -> dict:
    """Poll the 1-minute load average every minute until it stayed below ``threshold`` for ``minutes``
    consecutive readings, or ``max_hours`` passed. Returns what was seen: ``{"quiet", "waited_s", "readings"}``."""
    t0, run, readings = time.time(), 0, []
    while True:
        load = os.getloadavg()[0]
        readings.append(round(load, 2))
        run = run + 1 if load < threshold else 0
        if run >= minutes:
            return {"quiet": True, "waited_s": round(time.time() - t0), "last_readings": readings[-minutes:]}
        if time.time() - t0 > max_hours * 3600:
            return {"quiet": False, "waited_s": round(time.time() - t0), "last_readings": readings[-10:],
                    "min_reading": min(readings)}
        log(f"load {load:.2f} ({run}/{minutes} quiet readings below {threshold}), waiting")
        time.sleep(60)


def wait_until_idle(max_fraction: float, max_seconds: float = 900, sample: float = 10.0, log=print) -> float:
    """Sleep in ``sample``-second steps until the machine's CPUs were busy less than ``max_fraction`` of a step
    (this process sleeps meanwhile: what is busy is someone else), or ``max_seconds`` passed. Returns the last
    busy fraction seen."""
    t0, cores = time.time(), os.cpu_count() or 1
    while True:
        b0 = _cpu_busy_seconds()[0]
        time.sleep(sample)
        frac = (_cpu_busy_seconds()[0] - b0) / (sample * cores)
        if frac < max_fraction or time.time() - t0 > max_seconds:
            return frac
        log(f"other processes keep {100 * frac:.0f} % of the CPUs busy, waiting")


def run_one(spec: dict, env: Dict[str, str], timeout: float) -> dict:
    """One child process; returns its JSON plus the machine load around it."""
    load0 = os.getloadavg()
    busy0, steal0 = _cpu_busy_seconds()
    c0 = os.times()
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        try:
            res = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            res = {"arm": spec["arm"], "workload": spec["workload"], "round": spec["round"],
                   "error": f"exit {proc.returncode}: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    except subprocess.TimeoutExpired:
        res = {"arm": spec["arm"], "workload": spec["workload"], "round": spec["round"], "error": f"timeout {timeout}s"}
    wall = time.perf_counter() - t
    busy1, steal1 = _cpu_busy_seconds()
    c1 = os.times()
    ours = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    res.update(process_seconds=wall, loadavg_start=list(load0), loadavg_end=list(os.getloadavg()),
               other_cpu_seconds=max(0.0, (busy1 - busy0) - ours), steal_seconds=steal1 - steal0)
    return res


# ---------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------
def _quartiles(v: Sequence[float]) -> tuple:
    if len(v) < 2:
        return (v[0], v[0]) if v else (None, None)
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], q[2]


def summarise(runs: List[dict], arms: Sequence[str], workloads: Sequence[str]) -> List[dict]:
    """One row per workload and arm: seconds (median, min, max, IQR over rounds), ratio to stock (median and
    min-max of the per-round ratios), peak RSS (median, max), minor faults and system seconds (medians)."""
    ok = [r for r in runs if "error" not in r and not r.get("superseded")]
    by = {(r["workload"], r["arm"], r["round"]): r for r in ok}
    rows = []
    for w in workloads:
        for a in arms:
            mine = sorted((r for r in ok if r["workload"] == w and r["arm"] == a), key=lambda r: r["round"])
            if not mine:
                continue
            s = [r["seconds"] for r in mine]
            ratios = [r["seconds"] / by[(w, "stock", r["round"])]["seconds"] for r in mine
                      if (w, "stock", r["round"]) in by]
            q1, q3 = _quartiles(s)
            rows.append({"workload": w, "arm": a, "n": len(s), "median_s": statistics.median(s), "min_s": min(s),
                         "max_s": max(s), "q1_s": q1, "q3_s": q3,
                         "ratio_median": statistics.median(ratios) if ratios else None,
                         "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
                         "peak_rss_median": statistics.median(r["peak_rss"] for r in mine),
                         "peak_rss_max": max(r["peak_rss"] for r in mine),
                         "minor_faults_median": statistics.median(r["minor_faults"] for r in mine),
                         "sys_seconds_median": statistics.median(r["sys_seconds"] for r in mine)})
    return rows


def verdicts(rows: List[dict], candidates: Sequence[str] = ("glibc-memory",)) -> List[dict]:
    """Per workload and candidate arm: whether it beats the best library allocator (lowest median of
    :data:`LIBRARY_ARMS`) beyond the spread, i.e. its slowest round is faster than that allocator's fastest
    (``None`` with fewer than 3 rounds on either side: no spread to speak of)."""
    out = []
    for w in dict.fromkeys(r["workload"] for r in rows):
        lib = [r for r in rows if r["workload"] == w and r["arm"] in LIBRARY_ARMS]
        if not lib:
            continue
        best = min(lib, key=lambda r: r["median_s"])
        for c in candidates:
            row = next((r for r in rows if r["workload"] == w and r["arm"] == c), None)
            if row is not None:
                out.append({"workload": w, "arm": c, "best_library": best["arm"],
                            "median_over_best": row["median_s"] / best["median_s"],
                            "beats_beyond_spread": (row["max_s"] < best["min_s"]) if min(row["n"], best["n"]) >= 3
                            else None})
    return out


def load_summary(runs: List[dict]) -> dict:
    """Load average (1 min) at the start of every process, and the CPU other processes used meanwhile."""
    loads = [r["loadavg_start"][0] for r in runs if r.get("loadavg_start")]
    cores = os.cpu_count() or 1
    other = sum(r.get("other_cpu_seconds", 0.0) for r in runs)
    wall = sum(r.get("process_seconds", 0.0) for r in runs)
    return {"loadavg_1min_min": min(loads, default=None), "loadavg_1min_median":
            statistics.median(loads) if loads else None, "loadavg_1min_max": max(loads, default=None),
            "other_cpu_seconds": other, "other_cpu_fraction": other / (cores * wall) if wall else None, "cores": cores,
            "retried": sum(1 for r in runs if r.get("superseded")),
            "steal_seconds": sum(r.get("steal_seconds", 0.0) for r in runs)}


def to_markdown(res: dict) -> str:
    """The result as Markdown: the table, the verdicts, the load."""
    ld, cfg = res["load"], res["config"]
    quiet = res.get("quiet_wait") or {}
    lines = [f"_CPU allocators, {res['setup']}: torch {res['torch']}, {cfg['threads']} threads, size {cfg['size']}, "
             f"{cfg['rounds']} rounds, {len(res['runs'])} processes, {res['total_seconds'] / 60:.0f} min; "
             f"1-min load average at process starts {_f(ld['loadavg_1min_min'])}–{_f(ld['loadavg_1min_max'])} "
             f"(median {_f(ld['loadavg_1min_median'])}), other processes used "
             f"{100 * (ld['other_cpu_fraction'] or 0):.1f} % of the {ld['cores']} cores"
             f" ({ld['retried']} processes run again because others kept the CPUs busy)"
             + (f"; machine quiet before the start: {'yes' if quiet.get('quiet') else 'no'}" if quiet else "")
             + "_", "",
             "| workload | arm | median (s) | min–max (s) | IQR (s) | ratio to stock (min–max) | peak RSS (GB) | "
             "minor faults | sys (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["summary"]:
        lines.append(f"| {r['workload']} | {r['arm']} | {r['median_s']:.3f} | {r['min_s']:.3f}–{r['max_s']:.3f} | "
                     f"{r['q1_s']:.3f}–{r['q3_s']:.3f} | {_f(r['ratio_median'])} ({_f(r['ratio_min'])}–"
                     f"{_f(r['ratio_max'])}) | {r['peak_rss_median'] / 1e9:.2f} | {r['minor_faults_median']:,.0f} | "
                     f"{r['sys_seconds_median']:.2f} |")
    if res.get("verdicts"):
        lines += ["", "| workload | arm | best library allocator | median / best | beyond the spread |",
                  "|---|---|---|---|---|"]
        lines += [f"| {v['workload']} | {v['arm']} | {v['best_library']} | {v['median_over_best']:.3f} | "
                  f"{ {True: 'yes', False: 'no', None: 'n/a'}[v['beats_beyond_spread']]} |" for v in res["verdicts"]]
    if res.get("skipped"):
        lines += [""] + [f"- {a}: left out ({why})" for a, why in res["skipped"].items()]
    errors = [r for r in res["runs"] if "error" in r]
    if errors:
        lines += [""] + [f"- round {r['round']} {r['workload']} {r['arm']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def _setup(threads: int) -> tuple:
    """(setup name as ``glam3d bench`` names it, torch version) — in a child, so this process stays torch-free."""
    code = ("import json, torch; from glam3d.bench import machine_setup; "
            f"print(json.dumps([machine_setup('cpu', {threads}, ['forward'])['name'], torch.__version__]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--report", metavar="JSON", help="print a saved result's table and exit")
    p.add_argument("--size", choices=sorted(SIZES), default="full")
    p.add_argument("--rounds", type=int, default=4,
                   help="passes over every workload and arm; even, so that every arm runs as often early as late "
                        "(default 4)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per forward process (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in every process (default 2)")
    p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    p.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    p.add_argument("--out", default=os.path.join(ROOT, "experiments", "results"), help="result folder")
    p.add_argument("--wait-quiet", type=float, metavar="LOAD",
                   help="first wait until the 1-minute load average stayed below LOAD for 3 minutes (at most 3 h)")
    p.add_argument("--timeout", type=float, default=900, help="seconds one process may take (default 900)")
    p.add_argument("--max-busy", type=float, default=0.1, metavar="FRACTION",
                   help="a process during which other processes used more than FRACTION of the CPUs' time runs "
                        "again, once they are idle (default 0.1)")
    p.add_argument("--retries", type=int, default=3, help="at most this many reruns of one process (default 3)")
    p.add_argument("--idle-wait", type=float, default=900, metavar="SECONDS",
                   help="before a rerun, wait at most this long for idle CPUs (default 900)")
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(json.loads(a.worker))), flush=True)
        return 0
    if a.report:
        with open(a.report) as f:
            print(to_markdown(json.load(f)), end="")
        return 0
    if a.rounds < 1 or a.repeats < 1 or a.threads < 1 or a.retries < 0 or a.max_busy <= 0:
        p.error("--rounds, --repeats and --threads must be >= 1, --retries >= 0, --max-busy > 0")
    if "stock" not in a.arms:
        p.error("--arms must include stock (the ratios are to it)")
    from glam3d.utils.io import atomic_write_text

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    skipped, envs = {}, {}
    for arm in a.arms:
        try:
            envs[arm] = arm_environment(arm)
        except LookupError as e:
            skipped[arm] = str(e)
            log(f"{arm}: left out ({e})")
    arms = [x for x in a.arms if x in envs]
    setup, torch_version = _setup(a.threads)
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"allocators-{setup}" + ("" if a.size == "full" else f"-{a.size}"))
    quiet = wait_until_quiet(a.wait_quiet, log=log) if a.wait_quiet is not None else None
    if quiet is not None:
        log(f"quiet: {quiet}")
    res = {"setup": setup, "torch": torch_version, "skipped": skipped, "quiet_wait": quiet,
           "config": {"size": a.size, "rounds": a.rounds, "repeats": a.repeats, "threads": a.threads, "arms": arms,
                      "workloads": a.workloads, "params": {w: SIZES[a.size][w] for w in a.workloads},
                      "arm_env": {k: {**ARMS[k][0], **({"LD_PRELOAD": envs[k]["LD_PRELOAD"]} if ARMS[k][1] else {})}
                                  for k in arms}},
           "runs": []}
    order = schedule(arms, a.workloads, a.rounds)
    t0 = time.perf_counter()
    cores = os.cpu_count() or 1
    for i, (rnd, w, arm) in enumerate(order):
        env = dict(envs[arm], OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
        spec = {"arm": arm, "workload": w, "round": rnd, "threads": a.threads, "repeats": a.repeats,
                "params": SIZES[a.size][w]}
        for attempt in range(a.retries + 1):
            r = run_one(spec, env, a.timeout)
            r["attempt"] = attempt
            r["busy"] = r["other_cpu_seconds"] > a.max_busy * cores * r["process_seconds"]
            again = r["busy"] and attempt < a.retries
            if again:
                r["superseded"] = True
            res["runs"].append(r)
            done = time.perf_counter() - t0
            log(f"{i + 1}/{len(order)} round {rnd} {w} {arm}: "
                + (r["error"] if "error" in r else f"{r['seconds']:.3f} s, peak {r['peak_rss'] / 1e9:.2f} GB")
                + f"; load {r['loadavg_start'][0]:.2f}, others {r['other_cpu_seconds']:.1f} CPU s"
                + (" (busy: run again)" if again else f"; ~{done / (i + 1) * (len(order) - i - 1) / 60:.0f} min left"))
            res["total_seconds"] = done
            res["summary"] = summarise(res["runs"], arms, a.workloads)
            res["verdicts"] = verdicts(res["summary"])
            res["load"] = load_summary(res["runs"])
            res["complete"] = i + 1 == len(order) and not again
            atomic_write_text(stem + ".json", json.dumps(res, indent=1) + "\n")
            atomic_write_text(stem + ".md", to_markdown(res))
            if not again:
                break
            wait_until_idle(a.max_busy, a.idle_wait, log=log)
    print(to_markdown(res), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
