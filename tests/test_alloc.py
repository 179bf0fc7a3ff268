"""glam3d.alloc: the allocator settings return freed activation memory to the OS, and can be switched off."""
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
    assert tuned["state"]["profile"] == "memory" and tuned["state"]["trim_threshold_env"] is None
    assert default["state"] == {"enabled": False, "profile": None, "torch_imported": False, "mallopt": False,
                                "thp_env": None, "mmap_threshold_env": None, "trim_threshold_env": None}
    # glibc's dynamic threshold keeps the freed 4 MB blocks in the heap; a fixed 1 MiB threshold unmaps them
    assert default["retained"] > 32 * 2**20
    assert tuned["retained"] < 8 * 2**20


@glibc_only
def test_user_environment_wins():
    r = _child(GLAM3D_ALLOC_TUNING="memory", THP_MEM_ALLOC_ENABLE="0", MALLOC_MMAP_THRESHOLD_="not-a-number")
    assert r["state"]["thp_env"] == "0" and r["state"]["mmap_threshold_env"] == "not-a-number"
    assert r["state"]["mallopt"] is False  # a malformed threshold is not applied


@glibc_only
def test_speed_profile_reuses_the_heap():
    """``speed``: the 4 MB blocks stay in the (untrimmed) heap and are reused without page faults; the memory
    profile maps, faults in and unmaps them every round (huge pages off here so that faults count pages)."""
    speed = _child(GLAM3D_ALLOC_TUNING="speed", THP_MEM_ALLOC_ENABLE="0")
    memory = _child(GLAM3D_ALLOC_TUNING="memory", THP_MEM_ALLOC_ENABLE="0")
    assert speed["state"]["profile"] == "speed" and speed["state"]["mallopt"]
    assert speed["state"]["mmap_threshold_env"] == str(32 << 20)
    assert speed["state"]["trim_threshold_env"] == str(1 << 30)
    assert memory["faults"] > 8 * 8 * 1000  # 1,024 pages per 4 MB block, 8 blocks, rounds 3-10
    # reused: at most the one block per round that the pinned small tensor pushes to the heap top faults in
    assert speed["faults"] < memory["faults"] / 4
    assert speed["retained"] > 16 * 2**20  # the price: the heap keeps the blocks


def test_help_and_version_do_not_import_torch():
    """The default (cache) profile imports torch to install its allocator; that happens once a command runs, so
    ``glam3d --help``, ``--version`` and a sub-command's ``--help`` answer without the ~2 s torch import."""
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
