"""glam3d.alloc: by default nothing is tuned (PyTorch's allocator and glibc as they are); the opt-in memory
profile returns freed activation memory to the OS; a name that is not a profile warns and tunes nothing; a library
preloaded in place of glibc's malloc is named."""
import textwrap

import pytest

from glam3d.alloc import _glibc
from helpers import allocator_child

glibc_only = pytest.mark.skipif(_glibc() is None, reason="mallopt needs Linux/glibc")

# allocate and free 8 x 4 MB tensors ten times, a small tensor kept alive after each round pins the heap top
CHILD = textwrap.dedent("""
    import json, os
    from glam3d.alloc import tune_allocator
    state = tune_allocator()
    import torch
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    import resource
    keep, base, faults = [], rss(), 0
    for i in range(10):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.ones(1 << 20) for _ in range(8)]
        keep.append(torch.ones(1000))
        del xs
        faults += (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) if i >= 2 else 0  # steady state
    print(json.dumps({"state": state, "retained": rss() - base, "faults": faults}))
""")


def _child(**env):
    return allocator_child(CHILD, **env)


@glibc_only
def test_tuned_allocator_returns_freed_blocks():
    tuned, default = _child(GLAM3D_ALLOC_TUNING="memory"), _child(GLAM3D_ALLOC_TUNING="0")
    assert tuned["state"]["mallopt"] and tuned["state"]["thp_env"] == "1" and not tuned["state"]["torch_imported"]
    assert tuned["state"]["profile"] == "memory" and tuned["state"]["mmap_threshold_env"] == str(1 << 20)
    assert default["state"] == {"enabled": False, "profile": None, "torch_imported": False, "mallopt": False,
                                "thp_env": None, "mmap_threshold_env": None}
    # glibc's dynamic threshold keeps the freed 4 MB blocks in the heap; a fixed 1 MiB threshold unmaps them
    assert default["retained"] > 32 * 2**20
    assert tuned["retained"] < 8 * 2**20


@glibc_only
def test_user_environment_wins():
    r = _child(GLAM3D_ALLOC_TUNING="memory", THP_MEM_ALLOC_ENABLE="0", MALLOC_MMAP_THRESHOLD_="not-a-number")
    assert r["state"]["thp_env"] == "0" and r["state"]["mmap_threshold_env"] == "not-a-number"
    assert r["state"]["mallopt"] is False  # a malformed threshold is not applied


def test_help_and_version_do_not_import_torch():
    """``glam3d --help``, ``--version`` and a sub-command's ``--help`` answer without the ~2 s torch import."""
    out = allocator_child("""
        import json, sys
        from glam3d.cli import main
        seen = {}
        for argv in (["--version"], ["--help"], ["predict", "--help"], ["bench", "--help"]):
            try:
                main(argv)
            except SystemExit:
                pass
            seen[" ".join(argv)] = "torch" in sys.modules
        print(json.dumps(seen))
    """)
    out.pop("stderr")
    assert out and not any(out.values()), out


# a glam3d command, then the workload above: what the command left of the allocator settings
AFTER_COMMAND = textwrap.dedent("""
    import json, os, sys
    from glam3d.cli import main
    from glam3d.alloc import allocator_state
    rc = main(["configs"])
    seen = {"rc": rc, "state": allocator_state(), "torch_imported": "torch" in sys.modules,
            "env": {k: os.environ.get(k) for k in ("GLAM3D_ALLOC_TUNING", "THP_MEM_ALLOC_ENABLE",
                                                  "MALLOC_MMAP_THRESHOLD_")}}
    import torch
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    keep, base = [], rss()
    for i in range(10):
        xs = [torch.ones(1 << 20) for _ in range(8)]
        keep.append(torch.ones(1000))
        del xs
    seen["retained"] = rss() - base
    sys.stdout.flush()
    print(json.dumps(seen))
""")


@glibc_only
def test_commands_leave_the_allocator_alone_by_default():
    """Without ``GLAM3D_ALLOC_TUNING`` a command tunes nothing: no settings recorded or exported to children, and
    glibc keeps its dynamic mmap threshold (the freed 4 MB blocks stay in the heap, as in an untouched process)."""
    r = allocator_child(AFTER_COMMAND)
    assert r["rc"] == 0 and r["state"] == {} and not r["torch_imported"]
    assert r["env"] == {"GLAM3D_ALLOC_TUNING": None, "THP_MEM_ALLOC_ENABLE": None, "MALLOC_MMAP_THRESHOLD_": None}
    assert r["retained"] > 32 * 2**20


@glibc_only
def test_commands_apply_the_profile_the_environment_asks_for():
    """The opt-in still works through the command line: ``GLAM3D_ALLOC_TUNING=memory`` applies the memory profile
    before the command imports torch, and its fixed 1 MiB threshold returns the freed blocks."""
    r = allocator_child(AFTER_COMMAND, GLAM3D_ALLOC_TUNING="memory")
    assert r["rc"] == 0 and r["state"]["profile"] == "memory" and r["state"]["mallopt"]
    assert not r["state"]["torch_imported"] and r["env"]["THP_MEM_ALLOC_ENABLE"] == "1"
    assert r["env"]["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)
    assert r["retained"] < 8 * 2**20
    off = allocator_child(AFTER_COMMAND, GLAM3D_ALLOC_TUNING="0")
    assert off["state"]["enabled"] is False and off["env"]["THP_MEM_ALLOC_ENABLE"] is None


@pytest.mark.parametrize("value", ["cache", "speed", "fast"])
def test_a_name_that_is_not_a_profile_warns_and_tunes_nothing(value):
    """``GLAM3D_ALLOC_TUNING`` set to a name that is not a profile: a command still runs, with one warning line
    naming the variable and the profiles, and the allocator left as it is (nothing exported to children)."""
    r = allocator_child(AFTER_COMMAND, GLAM3D_ALLOC_TUNING=value)
    assert r["rc"] == 0 and r["state"]["enabled"] is False and r["state"]["mallopt"] is False
    assert r["env"] == {"GLAM3D_ALLOC_TUNING": value, "THP_MEM_ALLOC_ENABLE": None, "MALLOC_MMAP_THRESHOLD_": None}
    warnings = [ln for ln in r["stderr"].splitlines() if "warning" in ln]
    assert warnings == [f"glam3d: warning: GLAM3D_ALLOC_TUNING={value!r} is not a profile (memory; 0 or off: "
                        f"none); nothing tuned"]
    if _glibc() is not None:
        assert r["retained"] > 32 * 2**20  # glibc's dynamic threshold, as untouched


def _library(name: str):
    """The Debian / Ubuntu path of an allocator library (``libjemalloc2``, ``libtcmalloc-minimal4``), or None."""
    import glob
    found = sorted(glob.glob(f"/usr/lib/*-linux-gnu/{name}")) + sorted(glob.glob(f"/usr/lib*/{name}"))
    return found[0] if found else None


PRELOADED = """
    import ctypes, json
    from glam3d.alloc import preloaded_allocator
    libc = ctypes.CDLL(None)  # the symbols each library exports, looked up in the process's global scope
    print(json.dumps({"name": preloaded_allocator(), "mallctl": hasattr(libc, "mallctl"),
                      "tc_malloc": hasattr(libc, "tc_malloc")}))
"""


@pytest.mark.parametrize("name, library, symbol", [("jemalloc", "libjemalloc.so.2", "mallctl"),
                                                   ("tcmalloc", "libtcmalloc_minimal.so.4", "tc_malloc")])
def test_preloaded_allocator_is_named(name, library, symbol):
    """``preloaded_allocator`` names the library that ``LD_PRELOAD`` put in place of glibc's malloc (the library's
    own entry point is then in the process), and nothing in a process without one."""
    path = _library(library)
    if path is None:
        pytest.skip(f"{library} is not installed")
    r = allocator_child(PRELOADED, LD_PRELOAD=path)
    assert r[symbol] and r["name"] == name
    plain = allocator_child(PRELOADED, LD_PRELOAD="")
    assert plain == {"stderr": plain["stderr"], "name": None, "mallctl": False, "tc_malloc": False}
