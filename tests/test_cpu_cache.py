"""glam3d.cpu_cache: the caching CPU allocator reuses freed blocks, stays within peak-live + slack, computes the
same results as PyTorch's allocator, and falls back with one warning line where it cannot be built.

The allocator is process-wide and cannot be taken out again, so every check runs in a child process."""
import os
import shutil

import pytest

from glam3d.alloc import _glibc
from helpers import allocator_child

needs_compiler = pytest.mark.skipif(_glibc() is None or shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="the cache is compiled with a C++ compiler on Linux/glibc")


def _child(code: str, tmp_path, **env) -> dict:
    """:func:`helpers.allocator_child` building the library into ``tmp_path`` (never the user's cache)."""
    return allocator_child(code, GLAM3D_CACHE_DIR=str(tmp_path / "build"), **env)


REUSE = """
    import json, resource
    from glam3d.alloc import tune_allocator
    state = tune_allocator()
    import torch
    from glam3d import cpu_cache
    faults = 0
    for i in range(10):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        xs = [torch.ones(1 << 20) for _ in range(8)]  # 8 x 4 MB
        del xs
        faults += (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) if i >= 2 else 0
    print(json.dumps({"state": state, "faults": faults, "stats": cpu_cache.stats(),
                      "installed": cpu_cache.installed()}))
"""


@needs_compiler
def test_cache_profile_reuses_freed_blocks(tmp_path):
    r = _child(REUSE, tmp_path, THP_MEM_ALLOC_ENABLE="0")  # the default profile
    memory = _child(REUSE, tmp_path, GLAM3D_ALLOC_TUNING="memory", THP_MEM_ALLOC_ENABLE="0")
    assert r["state"]["profile"] == "cache" and r["installed"] and "cache_error" not in r["state"]
    assert memory["state"]["profile"] == "memory" and r["stderr"] == ""
    assert r["state"]["cache"]["slack_bytes"] == 64 << 20 and memory["stats"] == {} and not memory["installed"]
    s = r["stats"]
    assert s["misses"] == 8 and s["hits"] == 72  # the first round maps 8 blocks; the 9 others reuse them
    assert s["live_bytes"] == 0 and s["cached_bytes"] == 8 * (4 << 20) and s["peak_live_bytes"] == 8 * (4 << 20)
    # rounds 3-10: reused blocks are already mapped; the memory profile faults in 1,024 pages per 4 MB block
    assert memory["faults"] > 8 * 8 * 1000 and r["faults"] < memory["faults"] / 20


@needs_compiler
def test_cache_stays_within_peak_live_plus_slack(tmp_path):
    """Sizes that never repeat: every request misses, and the cache unmaps the oldest blocks so that mapped bytes
    stay under the live peak + slack, where a cache capped only by size would keep all of them."""
    r = _child("""
        import json
        from glam3d import cpu_cache
        import torch
        cpu_cache.install(slack_mb=8, cap_mb=1024)
        keep = torch.empty(40 << 20, dtype=torch.uint8)       # 40 MB live throughout
        for i in range(30):
            t = torch.empty((3 + 2 * i) << 20, dtype=torch.uint8)  # 3, 5, ... 61 MiB: no freed block fits later
            del t
        print(json.dumps({"stats": cpu_cache.stats()}))
    """, tmp_path)
    s = r["stats"]
    assert s["misses"] == 31 and s["hits"] == 0 and s["evictions"] > 0
    assert s["peak_live_bytes"] == (40 << 20) + (62 << 20)  # 61 MiB rounded up to 2 MiB
    assert s["peak_bytes"] <= s["peak_live_bytes"] + (8 << 20)
    assert (62 << 20) <= s["cached_bytes"] <= (62 << 20) + (8 << 20)


@needs_compiler
def test_miss_under_the_bound_resizes_an_evicted_block(tmp_path):
    """A miss that must give cached blocks up to stay under the bound resizes one of them instead of mapping a
    fresh block: shrunk, it keeps its pages (the old bytes are still there: nothing faulted in or zeroed);
    grown, only the added bytes are new. Mapped bytes stay under the bound."""
    r = _child("""
        import json
        from glam3d import cpu_cache
        import torch
        cpu_cache.install(slack_mb=8, cap_mb=1024)
        keep = torch.empty(40 << 20, dtype=torch.uint8)                         # 40 MiB live throughout
        steps = []
        for mib, fill in ((62, 7), (52, None), (62, None), (30, None)):
            s0 = cpu_cache.stats()
            t = torch.empty(mib << 20, dtype=torch.uint8)
            if fill is not None:
                t.fill_(fill)
            head = t[: 52 << 20 : 4096].eq(7).all().item()      # one byte a page: the old bytes still in place?
            s1 = cpu_cache.stats()
            steps.append({k: s1[k] - s0[k] for k in ("misses", "resizes", "fresh_bytes")} | {"head": head})
            del t
        print(json.dumps({"steps": steps, "stats": cpu_cache.stats()}))
    """, tmp_path)
    s, (first, shrunk, grown, small) = r["stats"], r["steps"]
    assert first == {"misses": 1, "resizes": 0, "fresh_bytes": 62 << 20, "head": True}   # a fresh mapping
    # 40 live + 62 cached + 52 asked > 102 peak live + 8 slack: the 62 MiB block shrinks to 52, pages kept
    assert shrunk == {"misses": 1, "resizes": 1, "fresh_bytes": 0, "head": True}
    # 62 asked, only the 52 MiB block cached and no room for both: it grows by 10 MiB; its first 52 kept
    assert grown == {"misses": 1, "resizes": 1, "fresh_bytes": 10 << 20, "head": True}
    assert small["resizes"] == 1 and small["fresh_bytes"] == 0                     # 62 -> 30: shrunk again
    assert s["peak_live_bytes"] == (40 << 20) + (62 << 20) and s["peak_bytes"] <= s["peak_live_bytes"] + (8 << 20)
    assert s["cached_bytes"] == 30 << 20 and s["live_bytes"] == 40 << 20


@needs_compiler
def test_cache_computes_what_pytorch_allocator_computes(tmp_path):
    """A GLAM-nnFormer forward (oneDNN fused linears, SDPA), a training step and a data loader with worker
    processes give bit-identical results with the cache and without: reused blocks are never read as if they
    were fresh zeros."""
    code = """
        import json, hashlib
        from glam3d.alloc import tune_allocator
        tune_allocator()
        import torch
        from glam3d import cpu_cache
        from glam3d.models.registry import build_model_spec
        torch.manual_seed(0)
        torch.set_num_threads(2)
        m = build_model_spec("glam_nnformer_tiny")
        x = torch.randn(2, 1, *m.default_crop)
        h = hashlib.sha256()
        with torch.no_grad():
            m.eval()
            for _ in range(3):
                h.update(m(x).numpy().tobytes())
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=1e-2)
        for _ in range(2):
            out = m(x)
            loss = sum(o.float().square().mean() for o in (out if isinstance(out, (list, tuple)) else [out]))
            opt.zero_grad(); loss.backward(); opt.step()
        h.update(torch.cat([p.detach().flatten() for p in m.parameters()]).numpy().tobytes())
        ds = torch.utils.data.TensorDataset(torch.arange(8.0).view(8, 1).expand(8, 1 << 19).contiguous())
        for (b,) in torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2):
            h.update(b.numpy().tobytes())
        print(json.dumps({"digest": h.hexdigest(), "stats": cpu_cache.stats()}))
    """
    cached = _child(code, tmp_path, GLAM3D_ALLOC_TUNING="cache")
    plain = _child(code, tmp_path, GLAM3D_ALLOC_TUNING="memory")
    assert cached["stats"]["hits"] > 0 and plain["stats"] == {}
    assert cached["digest"] == plain["digest"]


@needs_compiler
def test_library_is_built_once_atomically(tmp_path):
    from glam3d import cpu_cache
    first = cpu_cache.build_library(tmp_path)
    mtime = first.stat().st_mtime_ns
    assert cpu_cache.build_library(tmp_path) == first and first.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


FALLBACK = """
    import json, os
    from glam3d.alloc import tune_allocator
    from glam3d import cpu_cache
    state = tune_allocator()
    print(json.dumps({"state": state, "installed": cpu_cache.installed(),
                      "child_env": os.environ["GLAM3D_ALLOC_TUNING"]}))
"""


@pytest.mark.parametrize("asked", [True, False])
def test_unavailable_cache_falls_back_to_memory_profile(tmp_path, asked):
    """Without a compiler: the memory profile, one warning line when the cache was asked for by name, none when
    it was only the default; child processes are told not to try again."""
    env = {"GLAM3D_ALLOC_TUNING": "cache"} if asked else {}
    r = _child(FALLBACK, tmp_path, CXX=str(tmp_path / "no-such-compiler"), **env)
    assert r["state"]["profile"] == "memory" and not r["installed"] and r["child_env"] == "memory"
    assert r["state"]["mmap_threshold_env"] == str(1 << 20) or _glibc() is None
    assert "no-such-compiler" in r["state"]["cache_error"] and "\n" not in r["state"]["cache_error"]
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    if asked:
        assert len(lines) == 1 and lines[0].startswith("glam3d: warning: GLAM3D_ALLOC_TUNING=cache unavailable")
    else:
        assert lines == []
    assert not (tmp_path / "build").exists() or not any((tmp_path / "build").iterdir())


def test_bad_settings_are_refused(tmp_path):
    r = _child("""
        import json
        from glam3d import cpu_cache
        try:
            cpu_cache.install()
            msg = None
        except cpu_cache.CacheUnavailable as e:
            msg = str(e)
        print(json.dumps({"msg": msg, "installed": cpu_cache.installed()}))
    """, tmp_path, GLAM3D_CPU_CACHE_SLACK_MB="lots")
    assert r["msg"] == "GLAM3D_CPU_CACHE_SLACK_MB='lots' is not a whole number of MiB" and not r["installed"]
    # through the default profile: the memory profile, and one line, since the cache was configured
    r = _child(FALLBACK, tmp_path, GLAM3D_CPU_CACHE_SLACK_MB="lots")
    assert r["state"]["profile"] == "memory" and not r["installed"]
    assert r["stderr"].strip().endswith("GLAM3D_CPU_CACHE_SLACK_MB='lots' is not a whole number of MiB")
    assert len(r["stderr"].strip().splitlines()) == 1
