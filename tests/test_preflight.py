"""Checks before heavy work (:mod:`glam3d.engine.preflight`): window sizes against the network's divisor and the
window bounds, the network's weight bytes counted on the meta device, and refusals of networks beyond the
machine's memory — each one line, fast, and without building the network for real."""
from __future__ import annotations

import time

import pytest

from glam3d.engine import preflight as P
from glam3d.errors import UserError


def _real_build_spy(monkeypatch):
    """Record the device type of every network ``build_model`` returns (``"meta"`` for meta-device copies)."""
    from glam3d.models import registry

    built = []
    real = registry.build_model

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        built.append({p.device.type for p in model.parameters()})
        return model

    monkeypatch.setattr(registry, "build_model", spy)
    return built


# ------------------------------------------------------------------------------------------------ divisor, bytes
FIVE_STAGES = {"depths": [1] * 5, "num_heads": [1] * 5, "window_size": [2, 2, 2, 2, 1], "crop_size": [32, 64, 64]}


@pytest.mark.parametrize("name, kwargs", [
    ("nnformer_tiny", {}), ("glam_nnformer_synapse", {}),
    ("nnformer_tiny", {"depths": [1, 1, 1], "num_heads": [2, 4, 8], "window_size": [4, 4, 4]}),
    ("nnformer_tiny", FIVE_STAGES)])
def test_nnformer_divisor_is_patch_times_two_per_downsampling(name, kwargs):
    from glam3d.models.registry import model_config

    _, _, full = model_config(name, **kwargs)
    stages = len(full["depths"])
    expected = tuple(p * 2 ** (stages - 1) for p in full["patch_size"])  # from the paper's 4-stage pyramid
    assert P.network_divisor(P.meta_network(name, kwargs)) == expected


def test_divisor_of_other_families():
    assert P.network_divisor(P.meta_network("swin_unetr_tiny")) == (32, 32, 32)  # MONAI: 2 x 2^4
    assert P.network_divisor(P.meta_network("glam_swin_unet_tiny")) == (1, 1)  # the 2D networks pad their input


@pytest.mark.parametrize("name", ["nnformer_tiny", "glam_nnformer_tiny", "swin_unetr_tiny", "glam_swin_unet_tiny"])
def test_meta_copy_counts_the_real_networks_bytes(name):
    """The meta copy (SwinUNETR: large tensors on meta, small ones real) has the real network's parameters."""
    from glam3d.models.registry import build_model

    meta = P.meta_network(name)
    real = build_model(name)
    assert {p.device.type for p in meta.parameters() if p.numel() >= 1 << 16} == {"meta"}
    assert P.num_parameters(meta) == sum(p.numel() for p in real.parameters())
    assert P.weight_bytes(meta) == sum(t.numel() * t.element_size() for t in
                                       list(real.parameters()) + list(real.buffers()))


def test_too_many_blocks_refused_before_building(monkeypatch):
    built = _real_build_spy(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(P.TooManyBlocks, match=r"100,006 transformer blocks"):
        P.meta_network("nnformer_tiny", {"depths": [2, 2, 100000, 2]})
    with pytest.raises(P.TooManyBlocks, match=r"257 transformer blocks; no network here has more than 256"):
        P.meta_network("nnformer_tiny", {"depths": [1, 1, 254, 1]})
    assert time.perf_counter() - t0 < 5 and built == []


# ------------------------------------------------------------------------------------------------ window sizes
@pytest.mark.parametrize("roi, problem", [
    ([0, 32, 32], r"must be 3 positive sizes"),
    ([-16, 32, 32], r"must be 3 positive sizes"),
    ([16, 32], r"must be 3 whole sizes \(D, H, W\)"),
    ([16.0, 32, 32], r"must be 3 whole sizes"),
    ([True, 32, 32], r"must be 3 whole sizes"),
    ([16, 32, 8192], r"far larger than any scan \(at most 4096 voxels an axis"),
    ([4096, 4096, 4096], r"far larger than any scan"),
    ([24, 32, 32], r"must be divisible by the network's \(16, 32, 32\).*e\.g\. \[32, 32, 32\]"),
    ([16, 40, 96], r"must be divisible.*e\.g\. \[16, 32, 96\]"),
])
def test_check_roi_size_refuses(roi, problem):
    with pytest.raises(UserError, match=problem) as e:
        P.check_roi_size(roi, (16, 32, 32), source=None, what="--roi-size")
    assert str(e.value).startswith("--roi-size ") and "\n" not in str(e.value)


def test_check_roi_size_accepts_and_names_its_source():
    assert P.check_roi_size([16, 32, 64], (16, 32, 32)) == (16, 32, 64)
    assert P.check_roi_size([4096, 4096], (1, 1)) == (4096, 4096)  # a 2D window at the axis bound
    with pytest.raises(UserError, match=r"^ck\.pt: the checkpoint's val\.roi_size \[20, 32, 32\] must be divisible"):
        P.check_roi_size([20, 32, 32], (16, 32, 32), source="ck.pt", what="the checkpoint's val.roi_size")


def test_bounds_are_beyond_real_scans():
    # the largest windows used anywhere (Synapse crop, a whole 512 x 512 x 300 CT scan, a Cityscapes image) pass
    for roi in ([64, 128, 128], [512, 512, 300], [1024, 2048]):
        assert P.window_problem(roi, (1,) * len(roi)) is None


# ------------------------------------------------------------------------------------------------ memory
def test_check_fits_boundary(monkeypatch):
    monkeypatch.setattr(P, "machine_memory", lambda device="cpu": (1000, "this machine has"))
    P.check_fits(1000, "cpu")
    with pytest.raises(UserError, match=r"^f: net needs 1001 B for its weights alone, but this machine has "
                                         r"1000 B of memory$"):
        P.check_fits(1001, "cpu", "f", "net")


def test_machine_memory_is_ram_within_the_container_limit_plus_swap():
    def meminfo(key):
        with open("/proc/meminfo") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))

    def cgroup(name):
        try:
            text = open(f"/sys/fs/cgroup/{name}").read().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    ram = meminfo("MemTotal")
    if cgroup("memory.max") is not None:
        ram = min(ram, cgroup("memory.max"))
    swap = meminfo("SwapTotal")
    if cgroup("memory.swap.max") is not None:
        swap = min(swap, cgroup("memory.swap.max"))
    have, what = P.machine_memory("cpu")
    assert abs(have - (ram + swap)) <= 1 << 20 and what.startswith("this machine has")  # (page rounding)
    assert P.machine_memory("meta") is None


def test_training_bytes_counts_gradients_and_optimiser_state():
    from glam3d.config import OptimConfig

    meta = P.meta_network("nnformer_tiny")
    w = P.weight_bytes(meta)
    params = 4 * P.num_parameters(meta)  # float32
    assert P.training_bytes(meta, OptimConfig(name="adamw")) == w + 3 * params  # grad + exp_avg + exp_avg_sq
    assert P.training_bytes(meta, OptimConfig(name="sgd", momentum=0.99)) == w + 2 * params
    assert P.training_bytes(meta, OptimConfig(name="sgd", momentum=0.0)) == w + params


def test_checkpoint_network_beyond_memory_refused_fast_without_building(monkeypatch):
    built = _real_build_spy(monkeypatch)
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        P.check_checkpoint_network({"name": "nnformer_tiny", "kwargs": {"embed_dim": 65536}}, "big.pt")
    msg = str(e.value)
    assert time.perf_counter() - t0 < 5 and built == [{"meta"}]
    assert msg.startswith("big.pt: the network recorded in the checkpoint (nnformer_tiny, ")
    assert "TiB for its weights alone, but this machine has" in msg and "\n" not in msg
    # the same spec at a size that fits passes, and returns the meta copy
    assert P.check_checkpoint_network({"name": "nnformer_tiny", "kwargs": {}}, "ok.pt") is not None


def test_checkpoint_network_on_the_gpu_it_will_run_on(monkeypatch):
    seen = []

    def memory(device="cpu"):
        seen.append(str(device))
        return (10 ** 15, "this machine has") if str(device) == "cpu" else (10 ** 6, "GPU 0 (test) has")

    monkeypatch.setattr(P, "machine_memory", memory)
    with pytest.raises(UserError, match=r"ck\.pt: .* but GPU 0 \(test\) has 976\.6 KiB of memory"):
        P.check_checkpoint_network({"name": "nnformer_tiny", "kwargs": {}}, "ck.pt", device="cuda:0")
    assert seen == ["cpu", "cuda:0"]


@pytest.mark.parametrize("spec, problem", [({"name": "no_such_net"}, r"cannot rebuild.*unknown model"),
                                           ({"name": "nnformer_tiny", "kwargs": {"wings": 2}}, r"cannot rebuild"),
                                           ({}, r"records no network"),
                                           ({"name": "nnformer_tiny", "kwargs": [1]}, r"not a mapping")])
def test_checkpoint_spec_that_does_not_build(spec, problem):
    with pytest.raises(UserError, match=problem):
        P.check_checkpoint_network(spec, "ck.pt")


@pytest.mark.parametrize("kwargs, problem", [({"embed_dim": -6}, r"negative dimension"),
                                             ({"embed_dim": 2 ** 62}, r"overflow"),
                                             ({"window_size": [[10 ** 6] * 3] * 4}, r"overflow")])
def test_sizes_pytorch_refuses_are_refused_on_the_meta_device(kwargs, problem, monkeypatch):
    built = _real_build_spy(monkeypatch)
    with pytest.raises(UserError, match=rf"^ck\.pt: cannot rebuild the network recorded in the checkpoint \(.*"
                                        rf"(?i:{problem})"):
        P.check_checkpoint_network({"name": "nnformer_tiny", "kwargs": kwargs}, "ck.pt")
    assert built == []  # the build failed on the meta device; nothing was built for real


def test_training_on_a_gpu_needs_the_weights_on_the_cpu_too(tmp_path, monkeypatch):
    from glam3d.config import config_from_dict

    cfg = config_from_dict({"model": {"name": "nnformer_tiny"}, "data": {"root": "x", "roi_size": [16, 32, 32]},
                            "train": {"device": "cuda:0"}}, source="c.yaml")
    meta = P.meta_network("nnformer_tiny")
    sizes = {"cpu": P.weight_bytes(meta) - 1, "cuda:0": 10 ** 15}
    monkeypatch.setattr(P, "machine_memory", lambda device="cpu": (sizes[str(device)], f"{device} has"))
    with pytest.raises(UserError, match=r"^c\.yaml: .* needs [\d.]+ MiB for its weights alone, but cpu has"):
        P.check_training_network(meta, cfg, "c.yaml")
    sizes["cpu"] += 1
    P.check_training_network(meta, cfg, "c.yaml")
    sizes["cuda:0"] = P.training_bytes(meta, cfg.optim) - 1
    with pytest.raises(UserError, match=r"for its weights, gradients and sgd state alone, but cuda:0 has"):
        P.check_training_network(meta, cfg, "c.yaml")
