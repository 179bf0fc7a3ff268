"""`glam3d bench --quick`: runs end to end with the tiny models and prints/writes the full table.

No timing assertions (machines differ, CI is shared); only that every row, column, ratio and target is there.
"""
import dataclasses
import json
import math
import statistics
import time

import pytest
import torch

from glam3d.bench import QUICK_MODELS, TARGETS, BenchConfig, _tables, format_report, run_bench, to_markdown
from glam3d.cli import main

torch.set_num_threads(1)

pytest.importorskip("einops")  # SwinUNETR


@pytest.fixture(scope="module")
def quick_result():
    cfg = BenchConfig(quick=True, repeats=1, train_repeats=1, threads=1, matmul_size=256,
                      sw_volume=(32, 64, 96), scaling_volumes=[(32, 64, 64), (64, 64, 64), (96, 64, 64)],
                      long_ct_volumes=[(32, 64, 64), (96, 64, 64)], predict_ct_spacing=[5.0, 4.0, 4.0])
    return run_bench(cfg)


def test_rows_and_columns(quick_result):
    res = quick_result
    assert [r["model"] for r in res["rows"]] == QUICK_MODELS
    for r in res["rows"]:
        for key in ("params_M", "macs_G", "forward_s", "gflops", "peak_fraction", "sw_voxels_per_s",
                    "sw_peak_rss"):
            assert r.get(key) is not None and r[key] > 0, (r["model"], key, r.get("sw"))
    assert res["matmul_peak_gflops"] > 0
    # the peak is the better of two samples (before and after the forward rounds), and "% of peak" uses it
    assert len(res["matmul_peak_samples"]) == 2 and res["matmul_peak_gflops"] == max(res["matmul_peak_samples"])
    for r in res["rows"]:
        assert r["peak_fraction"] == pytest.approx(r["gflops"] / res["matmul_peak_gflops"])
    assert len(res["scaling"]) == 3 and len(res["long_ct"]) == 2
    for r in res["scaling"] + res["long_ct"]:
        assert "error" not in r, r
        assert r["seconds"] > 0 and r["peak_rss"] > r["rss_before"] > 0
    assert res["train"]["seconds"] > 0 and res["train"]["batch"] == 2
    # the long CTs through `glam3d predict` (a .nii.gz CT, a training-style checkpoint, a fresh process each)
    assert [r["volume"] for r in res["predict_ct"]] == [list(v) for v in ((32, 64, 64), (96, 64, 64))]
    for r in res["predict_ct"]:
        assert "error" not in r and r["exit_code"] == 0 and r["status"] == "written", r
        assert r["output_shape"] == r["volume"][::-1]              # the scan's stored (W, H, D) geometry
        assert r["peak_rss"] > r["rss_before"] > 0 and r["seconds"] > 0
        assert r["checkpoint_bytes"] > 8 * 2.41e6                   # weights + SGD momentum of nnformer_tiny
        # the checkpoint's validation settings, as the command read them (an overlap of 0 stays 0, not the 0.5 default)
        assert r["spacing"] == [5.0, 4.0, 4.0] and r["overlap"] == 0.0 and r["sw_batch_size"] == 1
        assert r["probabilities"] is False
    pct = {t["target"]: t for t in res["targets"]}["predict_ct_memory"]
    assert pct["status"] in ("PASS", "FAIL") and pct["value"] == max(r["peak_rss"] for r in res["predict_ct"])
    tiny = res["ratios"]["tiny"]
    for k in ("glam_over_nnformer_forward", "glam_over_nnformer_sw", "glam_over_swin_unetr_sw"):
        assert tiny[k] is not None and tiny[k] > 0
    # every target but the CUDA-graph ones (GPU only, listed where a GPU measured them)
    assert {t["target"] for t in res["targets"]} == {k for k in TARGETS if "_graph" not in k}
    assert all(t["status"] in ("PASS", "FAIL", "n/a") for t in res["targets"])
    json.dumps(res)  # serialisable


def test_report_text_and_markdown(quick_result):
    text = format_report(quick_result)
    for word in ["params (M)", "MACs (G)", "fwd (s)", "GFLOP/s", "% peak", "SW vox/s", "peak RSS (GB)", "ratios",
                 "growth with the volume", "long CT", "glam3d predict on the long CTs", "training step", "targets",
                 "allocator"] + QUICK_MODELS:
        assert word in text, word
    assert any(s in text for s in ("PASS", "FAIL"))
    md = to_markdown(quick_result)
    assert md.count("| glam_nnformer_tiny |") >= 1
    for _, head, body in _tables(quick_result):
        assert all(len(r) == len(head) for r in body)


def test_cli_quick_writes_files(tmp_path, capsys):
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    rc = main(["bench", "--quick", "--models", "nnformer_tiny", "--sections", "forward", "--repeats", "1",
               "--threads", "1", "--no-progress", "--json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    res = json.loads(out_json.read_text())
    assert [r["model"] for r in res["rows"]] == ["nnformer_tiny"]
    assert "nnformer_tiny" in out_md.read_text()
    assert "nnformer_tiny" in capsys.readouterr().out
    # the result names the setup it ran on: this CPU's ISA class, the one thread asked for, torch X.Y, fp32 only
    major, minor = torch.__version__.split(".")[:2]
    assert res["setup"]["name"] == f"cpu-{res['setup']['cpu_isa']}-1c-torch{major}.{minor}-fp32"
    assert res["setup"]["threads"] == res["machine"]["threads"] == 1
    assert f"[{res['setup']['name']}]" in out_md.read_text().splitlines()[0]


def test_cli_bad_option():
    assert main(["bench", "--quick", "--repeats", "0"]) == 2
    assert main(["bench", "--quick", "--models", "nosuchnet"]) == 2


def test_forward_ratio_is_median_of_paired_rounds():
    """A slow round (the machine got busy) slows both forwards of that round: the paired ratio ignores it, the
    ratio of medians would not."""
    from glam3d.bench import _pair, _paired
    rows = {"g": {"forward_all": [1.2, 2.4, 1.2, 1.2, 1.2], "forward_s": 1.2},
            "n": {"forward_all": [1.0, 2.0, 1.0, 1.0, 1.0], "forward_s": 1.0}}
    assert _paired(rows, "g", "n") == pytest.approx(1.2)
    # rounds 4-5 ran on a machine twice as slow: the medians pair round 2 of one with round 3 of the other
    rows["g"]["forward_all"], rows["g"]["forward_s"] = [1.3, 1.4, 1.2, 2.4, 2.4], 1.4
    rows["n"]["forward_all"], rows["n"]["forward_s"] = [1.0, 1.0, 1.0, 2.0, 2.0], 1.0
    assert _paired(rows, "g", "n") == pytest.approx(1.2)
    assert _pair(rows, "g", "n", "forward_s") == pytest.approx(1.4)
    assert _paired(rows, "g", "missing") is None


def test_median_ci_order_statistics_and_coverage():
    """The interval is the textbook one (n=6: min-max; n=20: 6th-15th value) and covers the true median of a
    skewed distribution in >= 95 % of samples."""
    import random
    from glam3d.bench import median_ci
    assert median_ci([1.0] * 5) is None  # 2 * (1/2)^5 > 5 %: no 95 % interval from 5 values
    assert median_ci([3, 1, 2, 6, 5, 4]) == (1, 6)
    assert median_ci(list(range(20, 0, -1))) == (6, 15)
    rng = random.Random(0)
    true_median = math.log(2)  # exponential(1)
    hits = 0
    for _ in range(2000):
        lo, hi = median_ci([rng.expovariate(1.0) for _ in range(15)])
        hits += lo <= true_median <= hi
    assert hits / 2000 >= 0.95


def test_forward_rounds_alternate_order():
    """Counterbalanced rounds: the order reverses every round, so no model always follows the same one."""
    from glam3d.bench import time_forward
    calls = []

    class Rec(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    models = {n: Rec(n) for n in "abc"}
    times = time_forward(models, {n: torch.zeros(1) for n in "abc"}, repeats=3, device="cpu")
    assert calls == list("abc" "cba" "abc" "cba")  # warm-up round, then 3 timed rounds
    assert all(len(t) == 3 for t in times.values())


def test_forward_target_unclear_when_threshold_inside_interval():
    from glam3d.bench import _targets
    ratios = {"synapse": {"glam_over_nnformer_forward": 1.19, "glam_over_nnformer_forward_ci95": (1.15, 1.24),
                          "glam_over_nnformer_sw": None},
              "tiny": {}}

    def status():
        return {t["target"]: t for t in _targets({}, ratios, {})}["glam_forward_ratio"]

    t = status()
    assert t["status"] == "UNCLEAR" and "1.150-1.240" in t["note"]
    ratios["synapse"]["glam_over_nnformer_forward_ci95"] = (1.12, 1.19)
    assert status()["status"] == "PASS"
    ratios["synapse"].update(glam_over_nnformer_forward=1.25, glam_over_nnformer_forward_ci95=(1.21, 1.3))
    assert status()["status"] == "FAIL"
    # the CUDA-graph targets: listed only where measured, judged like the eager ones
    assert not any("_graph" in t["target"] for t in _targets({}, ratios, {}))
    ratios["synapse"].update(glam_over_nnformer_forward_graph=1.35, glam_over_nnformer_sw_graph=0.81,
                             glam_over_nnformer_forward_graph_bf16=1.14, glam_over_nnformer_sw_graph_bf16=0.98)
    got = {t["target"]: t["status"] for t in _targets({}, ratios, {})}
    assert got["glam_forward_ratio_graph"] == got["glam_sw_ratio_graph"] == "FAIL"
    assert got["glam_forward_ratio_graph_bf16"] == got["glam_sw_ratio_graph_bf16"] == "PASS"
    # with both networks' multiply-adds measured, the ratio lines say the ratio at equal efficiency
    macs = {"glam_nnformer_synapse": {"macs_G": 252.1}, "nnformer_synapse": {"macs_G": 211.8}}
    ratios["synapse"]["glam_over_nnformer_sw"] = 0.82
    notes = {t["target"]: t["note"] for t in _targets(macs, ratios, {})}
    assert notes["glam_forward_ratio"].endswith("; multiply-adds 1.190")
    assert notes["glam_sw_ratio"].endswith("; 1 / multiply-adds 0.840")
    # with nnFormer's forward and sliding window measured, the sliding-window line also counts the shared work:
    # 51.0 s for 27 windows of 1.609 s, plus 27 x 1.609 x 0.190 s of GLAM's extra = 0.861
    macs["nnformer_synapse"].update(forward_s=1.609, sw_seconds=51.0, sw={"windows": 27})
    notes = {t["target"]: t["note"] for t in _targets(macs, ratios, {})}
    assert notes["glam_sw_ratio"].endswith("; 1 / multiply-adds 0.840, with the shared work 0.861")
    assert notes["glam_forward_ratio"].endswith("; multiply-adds 1.190")
    assert "multiply-adds" not in {t["target"]: t for t in _targets({}, ratios, {})}["glam_forward_ratio"]["note"]
    ratios["synapse"].update(glam_over_nnformer_forward=None, glam_over_nnformer_forward_ci95=None)
    assert "multiply-adds" not in {t["target"]: t for t in _targets(macs, ratios, {})}["glam_forward_ratio"]["note"]
    # nnFormer's rate: the better of eager and graph replays, the note says which
    rows = {"nnformer_synapse": {"peak_fraction": 0.31, "peak_fraction_graph": 0.62}}
    t = {t["target"]: t for t in _targets(rows, ratios, {})}["nnformer_peak_fraction"]
    assert t["status"] == "PASS" and t["value"] == 0.62 and "graph" in t["note"] and "31.0%" in t["note"]
    rows["nnformer_synapse"]["peak_fraction_graph"] = None
    t = {t["target"]: t for t in _targets(rows, ratios, {})}["nnformer_peak_fraction"]
    assert t["status"] == "FAIL" and t["value"] == 0.31 and t["note"] == ""


def test_bf16_section_on_any_device():
    """``--sections bf16`` works on a CPU too (the GPU default adds it): bf16 forward times, their paired ratio,
    bf16 sliding-window throughput, the bf16 matmul peak, and the extra table columns."""
    cfg = BenchConfig(quick=True, models=["glam_nnformer_tiny", "nnformer_tiny"], repeats=2, threads=1,
                      matmul_size=128, sw_volume=(32, 64, 64), sections=["forward", "bf16"])
    res = run_bench(cfg)
    assert res["matmul_peak_bf16_gflops"] > 0
    assert res["bf16_weights"] == "cast once (inference_weights)"  # as glam3d predict runs bf16 on a CPU
    for r in res["rows"]:
        assert r["forward_bf16_s"] > 0 and len(r["forward_bf16_all"]) == 2
        assert r["sw_bf16_voxels_per_s"] > 0, r.get("sw_bf16")
        assert "sw_voxels_per_s" not in r  # the fp32 sliding window was not asked for
    tiny = res["ratios"]["tiny"]
    expect = sorted(a / b for a, b in zip(res["rows"][0]["forward_bf16_all"], res["rows"][1]["forward_bf16_all"]))
    assert tiny["glam_over_nnformer_forward_bf16"] == pytest.approx(sum(expect) / 2)
    assert tiny["glam_over_nnformer_sw_bf16"] == pytest.approx(
        res["rows"][0]["sw_bf16_voxels_per_s"] / res["rows"][1]["sw_bf16_voxels_per_s"])
    title, head = _tables(res)[0][:2]
    assert "fwd bf16 (s)" in head and "SW bf16 vox/s" in head and "GPU peak (GB)" not in head
    assert "bf16 weights: cast once" in title


@pytest.mark.parametrize("native", [False, True])
def test_bf16_default_on_cpus_with_native_bf16(monkeypatch, native):
    """The CPU default measures bf16 only where the CPU computes it natively (AVX512-BF16 / AMX), where it is
    the faster way to run; sections given explicitly are kept as given."""
    import glam3d.inference.precision as inf

    monkeypatch.setattr(inf, "cpu_bf16_native", lambda: native)
    assert ("bf16" in BenchConfig(quick=True).resolved().sections) is native
    assert "graph" not in BenchConfig(quick=True).resolved().sections
    assert BenchConfig(quick=True, sections=["forward"]).resolved().sections == ["forward"]


def test_largest_volume_search(monkeypatch):
    """Doubling from 256 until a probe fails, then one bisection step; every probe recorded."""
    import glam3d.bench as bench
    seen = []

    def fake_child(spec, timeout=None):
        d = spec["volume"][0]
        seen.append(d)
        assert spec["amp"] == "bf16" and spec["overlap"] == 0.0 and spec["volume"][1:] == [512, 512]
        return {"error": "exit 1: CUDA out of memory"} if d > 1500 else {"seconds": d / 100, "gpu_peak": 1e9}

    monkeypatch.setattr(bench, "_run_child", fake_child)
    lv = bench._largest_volume("nnformer_tiny", "cuda", limit=4096)
    assert seen == [256, 512, 1024, 2048, 1536]
    assert lv["largest_depth"] == 1024 and lv["first_failure"] == 2048
    assert [p["depth"] for p in lv["probes"]] == seen and lv["probes"][3]["error"].endswith("out of memory")
    seen.clear()
    lv = bench._largest_volume("nnformer_tiny", "cuda", limit=1024)
    assert seen == [256, 512, 1024] and lv["largest_depth"] == 1024 and lv["first_failure"] is None


def test_sliding_window_child_warm_up(monkeypatch):
    """The warm-up forward runs with the measurement's batch size and autocast (always on CUDA; on a CPU when
    asked) and never inside the timed region: the model sees exactly one extra batch before predict_volume."""
    import glam3d.bench as bench
    calls, weights = [], set()
    real_build = bench._build

    def build(name, device, seed=0):
        m = real_build(name, device, seed)
        m.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape))
                                or weights.add(mod.stem.proj1.conv1.weight.dtype))  # (None: output kept)
        return m

    monkeypatch.setattr(bench, "_build", build)
    spec = {"model": "nnformer_tiny", "volume": [32, 64, 64], "device": "cpu", "overlap": 0.0, "sw_batch_size": 1,
            "threads": 1}
    cold = bench._worker(dict(spec))
    assert cold["warmed_up"] is False and len(calls) == 1  # one window, no warm-up
    assert weights == {torch.float32}
    calls.clear()
    weights.clear()
    warm = bench._worker(dict(spec, warmup=True, amp="bf16"))
    assert warm["warmed_up"] is True and calls == [(1, 1, 32, 64, 64)] * 2
    assert weights == {torch.bfloat16}  # bf16 on a CPU: the weights cast once, as glam3d predict does
    assert warm["labels_shape"] == [32, 64, 64]


def test_cli_bad_sw_batch_size():
    assert main(["bench", "--quick", "--sw-batch-size", "0"]) == 2


def test_graph_section_needs_cuda_and_reports_failed_captures(quick_result):
    """Off CUDA the graph section is skipped with a reason (no columns); a capture that fails is reported per
    model instead of stopping the run; captured timings and errors get their own columns."""
    import copy

    from glam3d.bench import capture_graphs
    res = run_bench(BenchConfig(quick=True, models=["nnformer_tiny"], repeats=1, threads=1, matmul_size=128,
                                sections=["forward", "graph"]))
    assert res["graph_skipped"] and "fwd graph (s)" not in _tables(res)[0][1]
    if not torch.cuda.is_available():
        m = torch.nn.Linear(2, 2)
        out = capture_graphs({"a": m, "b": m}, {"a": torch.zeros(1, 2), "b": torch.zeros(1, 2)}, "cpu")
        assert set(out) == {"a", "b"} and all(isinstance(v, str) and ":" in v for v in out.values())
    fake = copy.deepcopy(quick_result)
    fake["rows"][0].update(forward_graph_s=0.0123, forward_graph_bf16_s=0.0101)
    fake["rows"][1].update(forward_graph_error="RuntimeError: capture failed")
    head, body = _tables(fake)[0][1:]
    i = head.index("fwd graph (s)")
    assert body[0][i:i + 2] == ["0.0123", "0.0101"] and body[1][i] == "error" and body[2][i] == "-"
    # the sliding window replayed from CUDA graphs: its own columns, a failed child reads "error"
    fake["rows"][0].update(sw_graph={"voxels_per_s": 1.5e6}, sw_graph_voxels_per_s=1.5e6)
    fake["rows"][1].update(sw_graph={"error": "exit 1: capture failed"})
    head, body = _tables(fake)[0][1:]
    j = head.index("SW graph vox/s")
    assert body[0][j] == "1,500,000" and body[1][j] == "error" and body[2][j] == "-"


def test_sliding_window_rounds_are_paired_and_counterbalanced(monkeypatch):
    """``sw_rounds``: one child per model and round, the order reversed every round; throughput is the median
    over rounds, the GLAM / nnFormer ratio the median of the per-round ratios with its 95 % interval, and the
    target reads UNCLEAR when 0.85 lies inside that interval."""
    import glam3d.bench as bench
    order, speed = [], {"glam_nnformer_tiny": [80, 90, 85, 70, 95, 88], "nnformer_tiny": [100, 100, 99, 90, 100, 100]}

    def fake_child(spec, timeout=None):
        n = spec["model"]
        order.append(n)
        v = speed[n][sum(o == n for o in order) - 1]
        return {"voxels_per_s": float(v), "seconds": 1000.0 / v, "peak_rss": 1e9 + v, "overlap": spec["overlap"]}

    monkeypatch.setattr(bench, "_run_child", fake_child)
    models = ["glam_nnformer_tiny", "nnformer_tiny"]
    res = run_bench(BenchConfig(quick=True, models=models, sections=["sw"], sw_rounds=6, matmul_size=64))
    assert order == (models + models[::-1]) * 3
    g, v = res["rows"]
    assert g["sw_all"] == speed["glam_nnformer_tiny"] and g["sw_voxels_per_s"] == 86.5
    assert g["sw_peak_rss"] == 1e9 + 95 and g["sw"]["voxels_per_s"] in (85, 88)
    per_round = sorted(a / b for a, b in zip(*speed.values()))
    tiny = res["ratios"]["tiny"]
    assert tiny["glam_over_nnformer_sw"] == pytest.approx((per_round[2] + per_round[3]) / 2)
    assert tiny["glam_over_nnformer_sw_ci95"] == pytest.approx((per_round[0], per_round[-1]))
    t = {t["target"]: t for t in res["targets"]}["glam_sw_ratio"]
    assert t["status"] == "UNCLEAR" and "95 % CI 0.778-0.950" in t["note"]
    assert "median of 6 rounds" in _tables(res)[0][0]
    # one round: the plain ratio, no interval; a failed round marks the model's line as an error
    order.clear()
    speed["glam_nnformer_tiny"] = [80, "boom"]
    real = fake_child

    def failing(spec, timeout=None):
        if spec["model"] == "glam_nnformer_tiny" and "glam_nnformer_tiny" in order:
            order.append(spec["model"])
            return {"error": "exit 1: boom"}
        return real(spec, timeout)

    monkeypatch.setattr(bench, "_run_child", failing)
    res = run_bench(BenchConfig(quick=True, models=models, sections=["sw"], sw_rounds=2, matmul_size=64))
    g = res["rows"][0]
    assert g["sw"]["error"] == "exit 1: boom" and "sw_voxels_per_s" not in g
    assert res["ratios"]["tiny"]["glam_over_nnformer_sw"] is None
    assert _tables(res)[0][2][0][7] == "error"


def test_predict_ct_spacing_option():
    from glam3d.bench import _spacing3, _spacing_label
    assert _spacing3(4) == _spacing3([4]) == [4.0, 4.0, 4.0] and _spacing3([3, 0.8, 0.8]) == [3.0, 0.8, 0.8]
    assert _spacing_label(4.0) == "4" and _spacing_label([3, 0.8, 0.8]) == "3x0.8x0.8"
    assert main(["bench", "--quick", "--predict-ct-spacing", "3", "0.8"]) == 2
    assert main(["bench", "--quick", "--predict-ct-spacing", "0"]) == 2


def test_predict_ct_with_probabilities():
    """--predict-ct-probabilities runs the predict_ct lines with glam3d predict --probabilities (as the command's
    manifest records) and says so in the table."""
    from glam3d.bench import to_markdown
    cfg = BenchConfig(quick=True, threads=1, sections=["predict_ct"], long_ct_volumes=[(32, 64, 64)],
                      predict_ct_spacing=[5.0, 4.0, 4.0], predict_ct_probabilities=True)
    res = run_bench(cfg)
    (r,) = res["predict_ct"]
    assert r["exit_code"] == 0 and r["status"] == "written" and r["probabilities"] is True, r
    assert "written + probabilities" in to_markdown(res)
    pct = {t["target"]: t for t in res["targets"]}["predict_ct_memory"]
    assert "with --probabilities" in pct["note"]


def test_cli_bad_sw_rounds():
    assert main(["bench", "--quick", "--sw-rounds", "0"]) == 2


def test_cut_run_keeps_finished_sections(tmp_path, monkeypatch):
    """--json / --markdown are rewritten after every section: when a later section dies (a time limit, a lost
    machine) the files hold what was measured, marked PARTIAL, with the ratios of the finished sections."""
    import glam3d.bench as bench

    def cut(*a, **k):
        raise KeyboardInterrupt  # what `timeout` / Ctrl-C does to a long section

    monkeypatch.setattr(bench, "_train_step_time", cut)
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    rc = main(["bench", "--quick", "--models", "glam_nnformer_tiny", "nnformer_tiny", "--sections", "forward",
               "train", "--repeats", "2", "--threads", "1", "--no-progress", "--json", str(out_json),
               "--markdown", str(out_md)])
    assert rc == 130  # "interrupted"
    res = json.loads(out_json.read_text())
    assert res["complete"] is False and res["sections_done"] == ["forward"]
    assert all(len(r["forward_all"]) == 2 for r in res["rows"]) and "train" not in res
    assert res["ratios"]["tiny"]["glam_over_nnformer_forward"] > 0
    assert "PARTIAL" in out_md.read_text() and "done: forward" in out_md.read_text()
    # a finished run says so, and its report carries no PARTIAL mark
    seen = []
    res = run_bench(BenchConfig(quick=True, models=["nnformer_tiny"], sections=["forward"], repeats=1, threads=1,
                                matmul_size=64), on_section=lambda r: seen.append((list(r["sections_done"]),
                                                                                   r["complete"])))
    assert seen == [(["forward"], False)] and res["complete"] is True and "PARTIAL" not in format_report(res)


def test_variant_with_options_gets_its_own_ratios(monkeypatch, capsys):
    """``--models NAME:key=value``: the variant is measured beside the others (rows keyed by the spec, children
    build it with its options) and its per-round ratios over its vanilla twin and over NAME are reported; the
    targets stay on the default network."""
    import glam3d.bench as bench
    spec = "glam_nnformer_tiny:global_num_heads=[1,2,4,8]"
    speed = {"glam_nnformer_tiny": [80, 84, 82, 81, 83, 85], spec: [88, 90, 86, 89, 87, 91],
             "nnformer_tiny": [100, 100, 100, 100, 100, 100]}
    seen = []

    def fake_child(spec_, timeout=None):
        n = spec_["model"]
        seen.append(n)
        v = speed[n][sum(o == n for o in seen) - 1]
        return {"voxels_per_s": float(v), "seconds": 1.0, "peak_rss": 1e9, "overlap": spec_["overlap"]}

    monkeypatch.setattr(bench, "_run_child", fake_child)
    models = ["glam_nnformer_tiny", spec, "nnformer_tiny"]
    res = run_bench(BenchConfig(quick=True, models=models, sections=["sw"], sw_rounds=6, matmul_size=64))
    assert [r["model"] for r in res["rows"]] == models and set(seen) == set(models)
    assert res["rows"][1]["params_M"] == res["rows"][0]["params_M"]
    assert res["rows"][1]["macs_G"] == res["rows"][0]["macs_G"]
    r = res["ratios"][spec]
    assert r["over_nnformer_tiny_sw"] == pytest.approx(0.885)
    assert r["over_nnformer_tiny_sw_ci95"] == pytest.approx((0.86, 0.91))
    assert r["over_glam_nnformer_tiny_sw"] == pytest.approx(statistics.median(
        a / b for a, b in zip(speed[spec], speed["glam_nnformer_tiny"])))
    assert "over_nnformer_tiny_forward" not in r  # not measured: left out, not None
    assert res["ratios"]["tiny"]["glam_over_nnformer_sw"] == pytest.approx(0.825)
    t = {t["target"]: t for t in res["targets"]}["glam_sw_ratio"]
    assert t["value"] == pytest.approx(0.825)  # the default network's, not the variant's
    text = format_report(res)
    assert f"{spec}  over_nnformer_tiny_sw " in text
    # the CLI checks a spec before measuring anything: one line naming it, exit 2
    assert main(["bench", "--quick", "--models", "glam_nnformer_tiny:nosuch=1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "glam_nnformer_tiny:nosuch=1" in err[0] and "nosuch" in err[0]


def test_compiled_section_times_compiled_models_and_reports_failures(monkeypatch):
    """`--sections compiled`: each model goes through compile_network (inference, static shapes), its first
    call is reported as the compile time, the compiled forwards are timed in paired rounds with the GLAM /
    nnFormer ratio; a model that fails to compile gets an error cell and the others are still measured.
    (Backend swapped for aot_eager: inductor takes minutes per network on two cores.)"""
    real_compile, seen = torch.compile, []

    def fake_compile(model, **kw):
        seen.append(kw)
        if getattr(model, "fail_compile", False):
            raise RuntimeError("inductor exploded\nsecond line")
        return real_compile(model, backend="aot_eager", fullgraph=True, dynamic=kw.get("dynamic"))

    monkeypatch.setattr(torch, "compile", fake_compile)
    models = ["glam_nnformer_tiny", "nnformer_tiny"]
    res = run_bench(BenchConfig(quick=True, models=models, repeats=2, threads=1, matmul_size=128,
                                sections=["compiled"]))
    assert seen and all(kw.get("dynamic") is False for kw in seen)
    for r in res["rows"]:
        assert len(r["forward_compiled_all"]) == 2 and r["compile_s"] > 0 and r["gflops_compiled"] > 0
    assert res["ratios"]["tiny"]["glam_over_nnformer_forward_compiled"] > 0
    head, body = _tables(res)[0][1:]
    i = head.index("fwd compiled (s)")
    assert all(line[i] not in ("-", "error") for line in body) and head[i + 1] == "compile (s)"

    import glam3d.bench as bench
    build = bench._build

    def failing_build(name, device, seed=0):
        m = build(name, device, seed)
        m.fail_compile = name == "nnformer_tiny"
        return m

    monkeypatch.setattr(bench, "_build", failing_build)
    res = run_bench(BenchConfig(quick=True, models=models, repeats=1, threads=1, matmul_size=128,
                                sections=["compiled"]))
    rows = {r["model"]: r for r in res["rows"]}
    assert rows["nnformer_tiny"]["forward_compiled_error"] == "RuntimeError: inductor exploded"
    assert "forward_compiled_s" in rows["glam_nnformer_tiny"]
    assert res["ratios"]["tiny"]["glam_over_nnformer_forward_compiled"] is None
    head, body = _tables(res)[0][1:]
    assert [line[head.index("fwd compiled (s)")] == "error" for line in body] == [False, True]


def test_long_ct_linearity_is_per_window():
    """Time is compared per window: a 200-slice scan needs 4 rows of 64-slice windows (1.28x its voxels), 1,000
    slices 16 rows, so s/voxel differs by the window grid's rounding while s/window shows any real slowdown."""
    from glam3d.bench import _targets

    def row(d, windows, seconds):
        return {"model": "nnformer_synapse", "volume": [d, 512, 512], "overlap": 0.0, "windows": windows,
                "seconds": seconds, "peak_rss": 1.6e9, "rss_before": 1.0e9}

    empty = {k: None for k in ("glam_over_nnformer_forward", "glam_over_nnformer_sw")}
    for slow, status in ((1.0, "PASS"), (1.5, "FAIL")):
        res = {"long_ct": [row(200, 64, 229.2), row(1000, 256, 887.5 * slow)]}
        t = {x["target"]: x for x in _targets({}, {"synapse": empty, "tiny": empty}, res)}["long_ct_linear"]
        assert t["status"] == status
        assert t["value"] == pytest.approx((887.5 * slow / 256) / (229.2 / 64))
        assert "s/voxel ratio %.3f" % ((887.5 * slow / 1000) / (229.2 / 200)) in t["note"]


def test_report_names_the_allocator_profile():
    """The table header says which allocator measured it: glam3d's memory profile and what it set, or what a
    stored result recorded (results measured with a profile glam3d no longer has keep its name)."""
    from glam3d.bench import _alloc
    base = {"enabled": True, "thp_env": "1", "torch_imported": False, "mallopt": True,
            "mmap_threshold_env": str(1 << 20)}
    assert _alloc({"allocator": {**base, "profile": "memory"}}) == "memory profile: THP+mmap>=1024 KiB"
    assert _alloc({"allocator": {**base, "profile": "memory", "torch_imported": True}}) == \
        "memory profile: mmap>=1024 KiB"  # THP is read at torch's first allocation: too late once imported
    stored = {**base, "profile": "cache",
              "cache": {"slack_bytes": 64 << 20, "cap_bytes": 2 << 30, "min_bytes": 1 << 20}}
    assert _alloc({"allocator": stored}) == "cache profile: THP+mmap>=1024 KiB"
    assert _alloc({"allocator": {"enabled": False}}) == "default"
    # a library preloaded in place of glibc's malloc, with the jemalloc settings it ran with
    je = {"enabled": False, "preloaded": "jemalloc", "malloc_conf": "oversize_threshold:1,background_thread:true"}
    assert _alloc({"allocator": je}) == "jemalloc (LD_PRELOAD, MALLOC_CONF=oversize_threshold:1,background_thread:true)"
    assert _alloc({"allocator": {"preloaded": "tcmalloc", "malloc_conf": None}}) == "tcmalloc (LD_PRELOAD)"
    assert _alloc({"allocator": {**base, "profile": "memory", "preloaded": "tcmalloc"}}) == \
        "memory profile: THP+mmap>=1024 KiB; tcmalloc (LD_PRELOAD)"


def test_synthetic_nifti_ct_is_the_synthetic_planes(tmp_path):
    """The predict_ct scans: written 16 planes at a time as a .nii.gz that nibabel reads back as the same planes
    (stored (W, H, D), int16, the bench's voxel size)."""
    import nibabel as nib
    import numpy as np

    from glam3d.bench import PREDICT_CT_VOXEL, _synthetic_ct_planes, _write_ct_nifti

    _write_ct_nifti(str(tmp_path / "ct.nii.gz"), (37, 20, 24))
    img = nib.load(str(tmp_path / "ct.nii.gz"))
    assert img.shape == (24, 20, 37) and img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.header.get_zooms(), PREDICT_CT_VOXEL[::-1])
    data = np.asanyarray(img.dataobj)
    want = np.concatenate([_synthetic_ct_planes(d, min(d + 16, 37), (20, 24))[0].numpy() for d in range(0, 37, 16)])
    np.testing.assert_array_equal(data.transpose(2, 1, 0), want)


# ---------------------------------------------------------------------------------------------------------------
# result files named by the hardware setup (no measurement: names from given parts, the CLI over a stand-in run)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capability, flags, machine, expected", [
    ("AVX512", ["fpu", "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"], "x86_64", "avx512-amx"),
    ("AVX512", ["avx2", "avx512f", "avx512_bf16"], "x86_64", "avx512-bf16"),
    ("AVX512", ["avx2", "avx512f"], "x86_64", "avx512"),
    ("AVX2", ["avx2"], "x86_64", "avx2"),
    ("DEFAULT", ["fp", "asimd"], "aarch64", "arm64"),
    ("DEFAULT", [], "arm64", "arm64"),
    ("DEFAULT", [], "AMD64", "x86-64"),
    ("DEFAULT", [], "", "default"),
    ("SVE256", ["sve", "bf16"], "aarch64", "sve256"),
    ("ZVECTOR", [], "s390x", "zvector"),
])
def test_cpu_isa_class(capability, flags, machine, expected):
    from glam3d.bench import cpu_isa_class
    assert cpu_isa_class(capability, flags, machine) == expected


def test_gpu_class():
    from glam3d.bench import gpu_class
    names = {"NVIDIA H100 80GB HBM3": "h100", "NVIDIA H200": "h200", "NVIDIA A100-SXM4-40GB": "a100",
             "Tesla V100-SXM2-16GB": "v100", "NVIDIA GeForce RTX 4090": "rtx4090", "NVIDIA L40S": "l40s",
             "AMD Instinct MI250X": "mi250x", "NVIDIA RTX A6000": "rtxa6000"}
    assert {n: gpu_class(n) for n in names} == names
    with pytest.raises(ValueError, match="no model"):
        gpu_class("NVIDIA")


def test_setup_name_and_precisions():
    from glam3d.bench import setup_name, setup_precisions
    assert setup_precisions(["forward", "sw", "scaling", "long_ct", "predict_ct", "train"]) == ["fp32"]
    assert setup_precisions(["forward", "sw", "bf16"]) == ["fp32", "bf16"]
    assert setup_precisions(["bf16"]) == ["bf16"] and setup_precisions(["gpu"]) == ["bf16"]
    assert setup_precisions(["graph"], tf32=True) == ["tf32", "bf16"]
    assert setup_name("cpu", "2.13.0+cpu", ["bf16", "fp32"], isa="avx512-amx", threads=2) == \
        "cpu-avx512-amx-2c-torch2.13-fp32-bf16"
    assert setup_name("cpu", "2.13.1", ["fp32"], isa="avx2", threads=16) == "cpu-avx2-16c-torch2.13-fp32"
    assert setup_name("cuda:1", "2.11.0+cu130", ["fp32", "bf16"], gpu="NVIDIA H100 80GB HBM3", threads=16) == \
        "gpu-h100-torch2.11-fp32-bf16"
    assert setup_name("cuda", "2.11.0", ["tf32"], gpu="NVIDIA A100-SXM4-80GB") == "gpu-a100-torch2.11-tf32"
    assert setup_name("mps", "2.13.0", ["fp32"]) == "mps-torch2.13-fp32"
    for bad in (dict(device="cpu", torch_version="2.13.0", precisions=["fp32"], isa="avx2"),      # no threads
                dict(device="cpu", torch_version="2.13.0", precisions=["fp16"], isa="avx2", threads=2),
                dict(device="cpu", torch_version="2.13.0", precisions=[], isa="avx2", threads=2),
                dict(device="cuda", torch_version="2.13.0", precisions=["fp32"]),                   # no GPU name
                dict(device="cpu", torch_version="nightly", precisions=["fp32"], isa="avx2", threads=2)):
        with pytest.raises(ValueError):
            setup_name(**bad)


def test_machine_setup_reads_this_machine(monkeypatch):
    """The CPU part comes from ATen's kernel level and the CPU's flags."""
    import glam3d.bench as bench
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(bench, "_cpu_flags", lambda: ["avx2", "avx512f", "avx512_bf16", "amx_bf16"])
    monkeypatch.setattr(torch, "__version__", "2.13.0+cpu")
    s = bench.machine_setup("cpu", 2, ["forward", "sw", "bf16"])
    assert s == {"name": "cpu-avx512-amx-2c-torch2.13-fp32-bf16", "device": "cpu", "cpu_isa": "avx512-amx",
                 "threads": 2, "gpu": None, "torch": "2.13", "precisions": ["fp32", "bf16"]}
    # a GPU: its model from the device's name, tf32 where TF32 matmuls are on; a name without a model: "unknown"
    names = iter(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "NVIDIA"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: next(names))
    g = bench.machine_setup("cuda", 16, ["forward", "sw", "graph"])
    assert g["name"] == "gpu-h100-torch2.13-fp32-bf16" and g["device"] == "gpu" and g["gpu"] == "NVIDIA H100 80GB HBM3"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # (a torch setting monkeypatch cannot restore)
    try:
        assert bench.machine_setup("cuda:0", 16, ["forward"])["name"] == "gpu-h100-torch2.13-tf32"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert bench.machine_setup("cuda", 16, ["gpu"])["name"] == "gpu-unknown-torch2.13-bf16"


def _stand_in_run_bench(seen):
    """A ``run_bench`` that measures nothing: one report per section (``on_section``), recording which result
    files exist at each call, then the finished report."""
    import glam3d.bench as bench

    def run(cfg, on_section=None):
        cfg = cfg.resolved()
        res = {"config": dataclasses.asdict(cfg), "sections_done": [], "matmul_peak_gflops": 100.0,
               "machine": {"device": "cpu", "torch": torch.__version__, "threads": cfg.threads, "cpu_count": 2,
                           "loadavg_start": None, "gpu": None},
               "setup": bench.machine_setup(cfg.device, cfg.threads, cfg.sections)}
        rows = {m: {"model": m, "crop": [32, 64, 64], "params_M": 1.0, "macs_G": 2.0, "forward_s": 0.5,
                    "forward_all": [0.5]} for m in cfg.models}
        for section in cfg.sections:
            res["sections_done"].append(section)
            on_section(bench._summarise(res, rows, cfg, time.perf_counter(), complete=False))
            seen.append(sorted(p.name for p in seen[0].iterdir()))
        return bench._summarise(res, rows, cfg, time.perf_counter(), complete=True)
    return run


def test_cli_save_writes_the_setup_named_files(tmp_path, monkeypatch, capsys):
    """--save DIR: the result goes to DIR/<setup>.json + .md; while the run goes on to <setup>.partial.json /
    .md (removed at the end), so a cut run never replaces a finished result; a narrower run, or a file that is
    not a bench result, is not replaced (one line, exit 2, the file unchanged)."""
    import glam3d.bench as bench
    out = tmp_path / "results"
    seen = [out]
    monkeypatch.setattr(bench, "run_bench", _stand_in_run_bench(seen))
    name = bench.machine_setup("cpu", 1, ["forward", "train"])["name"]
    args = ["bench", "--quick", "--models", "nnformer_tiny", "glam_nnformer_tiny", "--threads", "1",
            "--no-progress", "--save", str(out)]
    assert main(args + ["--sections", "forward", "train"]) == 0
    assert seen[1:] == [[f"{name}.partial.json", f"{name}.partial.md"]] * 2
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.json", f"{name}.md"]
    res = json.loads((out / f"{name}.json").read_text())
    assert res["setup"]["name"] == name and res["complete"] is True and res["sections_done"] == ["forward", "train"]
    assert (out / f"{name}.md").read_text().startswith(f"_glam3d bench [{name}]:")
    assert f"saved: {out / name}.json" in capsys.readouterr().out
    before = (out / f"{name}.json").read_bytes()

    # a narrower run (a section or a model fewer) would lose figures: refused before measuring
    seen[1:] = []
    assert main(args + ["--sections", "forward"]) == 2
    assert main(args[:4] + args[5:] + ["--sections", "forward", "train"]) == 2  # nnformer_tiny only
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "train, which this run leaves out" in err[0] and "glam_nnformer_tiny" in err[1]
    assert seen[1:] == [] and (out / f"{name}.json").read_bytes() == before
    # the same or a wider run replaces it
    assert main(args + ["--sections", "train", "forward"]) == 0 and seen[1:]
    assert sorted(p.name for p in out.iterdir()) == [f"{name}.json", f"{name}.md"]

    # a file there that glam3d bench did not write is never replaced
    (out / f"{name}.json").write_text('{"mine": 1}\n')
    assert main(args + ["--sections", "forward", "train"]) == 2
    assert "is not a glam3d bench result" in capsys.readouterr().err
    assert (out / f"{name}.json").read_text() == '{"mine": 1}\n'
    # --save must be a folder
    assert main(args[:-1] + [str(out / f"{name}.md"), "--sections", "forward"]) == 2


def test_cli_save_cut_run_keeps_the_finished_result(tmp_path, monkeypatch):
    """A run cut after its first section leaves its measurements in the .partial files, beside the finished
    result of an earlier run, which stays as it was."""
    import glam3d.bench as bench
    out = tmp_path / "results"
    name = bench.machine_setup("cpu", 1, ["forward", "train"])["name"]
    args = ["bench", "--quick", "--models", "nnformer_tiny", "--threads", "1", "--no-progress", "--save", str(out),
            "--sections", "forward", "train"]
    monkeypatch.setattr(bench, "run_bench", _stand_in_run_bench([out]))
    assert main(args) == 0
    finished = (out / f"{name}.json").read_bytes()

    def cut_after_first(cfg, on_section=None):
        def once(res):
            on_section(res)
            raise KeyboardInterrupt
        return _stand_in_run_bench([out])(cfg, once)

    monkeypatch.setattr(bench, "run_bench", cut_after_first)
    assert main(args) == 130
    assert (out / f"{name}.json").read_bytes() == finished
    partial = json.loads((out / f"{name}.partial.json").read_text())
    assert partial["complete"] is False and partial["sections_done"] == ["forward"]
    assert "PARTIAL" in (out / f"{name}.partial.md").read_text()


def test_kept_results_are_named_by_their_setup():
    """experiments/results holds one result per setup, each named by what it records: the name rebuilt from the
    file's machine, config and setup fields is its file name; no device UUIDs or temporary paths."""
    import pathlib
    import re

    from glam3d.bench import setup_name, setup_precisions
    folder = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "results"
    files = sorted(folder.glob("*.json"))
    if not files:
        pytest.skip("no experiments/results in this checkout")
    for f in files:
        res = json.loads(f.read_text())
        if f.stem.startswith("allocators-"):  # experiments/allocators.py: named by the setup it records
            assert f.stem == f"allocators-{res['setup']}" and res["complete"], f.name
            assert f.with_suffix(".md").exists(), f.name
            continue
        m, setup = res["machine"], res["setup"]
        tf32 = bool((m.get("cuda_tf32") or {}).get("matmul"))
        name = setup_name(m["device"], m["torch"], setup_precisions(res["config"]["sections"], tf32),
                          isa=setup.get("cpu_isa"), threads=m["threads"], gpu=m.get("gpu"))
        assert f.stem == name == setup["name"], f.name
        assert format_report(res) and to_markdown(res)  # the current report reads every kept file
    for f in folder.iterdir():
        text = f.read_text()
        assert not re.search(r"GPU-[0-9a-f]{8}-|/tmp/|tmp\.[A-Za-z0-9]{6,}", text), f.name
