"""Config files: YAML -> dataclasses, strict keys and types (one-line errors naming key and file), ``base:``
inheritance, ``--override`` parsing, and the shipped experiment configs."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from glam3d.config import Config, config_from_dict, dump_config, load_config, validate_config
from glam3d.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "glam3d" / "configs"


def _write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_synapse_config_is_the_official_schedule():
    cfg = load_config(CONFIGS / "synapse_glam_nnformer.yaml")
    assert cfg.name == "synapse_glam_nnformer" and cfg.run_dir == Path("runs/synapse_glam_nnformer")
    assert cfg.model.name == "glam_nnformer_synapse"
    assert cfg.data.roi_size == [64, 128, 128] and cfg.data.batch_size == 2
    o = cfg.optim
    assert (o.name, o.lr, o.momentum, o.nesterov, o.schedule, o.poly_power, o.grad_clip) == \
        ("sgd", 0.01, 0.99, True, "poly", 0.9, 12.0)
    t = cfg.train
    assert (t.epochs, t.iters_per_epoch, t.amp) == (1000, 250, "fp16")
    assert t.deep_supervision == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert cfg.loss.name == "dice_ce" and 0 < cfg.data.val_fraction < 1


THREE_D = sorted(list(CONFIGS.glob("synapse_*.yaml")) + list(CONFIGS.glob("phantom_*.yaml")))  # the 3D configs


@pytest.mark.parametrize("path", THREE_D, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    validate_config(cfg, str(path))
    assert cfg.name == path.stem
    yaml_text = dump_config(cfg)
    assert "optim:" in yaml_text and "base:" not in yaml_text


def test_ablations_inherit_and_override():
    gt = {n: load_config(CONFIGS / f"synapse_glam_nnformer_tokens{n}.yaml") for n in (0, 1, 5, 20)}
    for n, cfg in gt.items():
        assert cfg.model.overrides == {"deep_supervision": True, "num_global_tokens": n}
        assert cfg.optim.lr == 0.01 and cfg.train.epochs == 1000  # inherited
    assert load_config(CONFIGS / "synapse_glam_nnformer_nogmsa.yaml").model.overrides["gmsa"] is False
    assert load_config(CONFIGS / "synapse_glam_nnformer_nonlu.yaml").model.overrides["nlu"] is False
    gmsa64 = load_config(CONFIGS / "synapse_glam_nnformer_gmsa64.yaml").model
    assert gmsa64.overrides == {"deep_supervision": True, "global_num_heads": [3, 6, 12, 24]}
    assert load_config(CONFIGS / "synapse_nnformer.yaml").model.name == "nnformer_synapse"
    tiny = load_config(CONFIGS / "phantom_glam_nnformer_tiny.yaml")
    assert tiny.model.name == "glam_nnformer_tiny" and tiny.optim.name == "adamw" and tiny.train.amp == "none"


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = _write(tmp_path, "optim:\n  lrr: 0.1\n")
    with pytest.raises(UserError) as e:
        load_config(p)
    msg = str(e.value)
    assert "optim.lrr" in msg and "optim.lr" in msg and str(p) in msg and "\n" not in msg
    p = _write(tmp_path, "trian:\n  epochs: 3\n")
    with pytest.raises(UserError, match=r"unknown config key 'trian' \(did you mean train\?\)"):
        load_config(p)


@pytest.mark.parametrize("text, key", [
    ("train:\n  epochs: ten\n", "train.epochs"),
    ("train:\n  compile: 1\n", "train.compile"),
    ("train:\n  amp: fp8\n", "train.amp"),
    ("data:\n  roi_size: 64\n", "data.roi_size"),
    ("data:\n  roi_size: [64, x, 64]\n", "data.roi_size[1]"),
    ("optim: sgd\n", "optim"),
    ("optim:\n  grad_clip: big\n", "optim.grad_clip"),
])
def test_wrong_type_names_key_and_file(tmp_path, text, key):
    p = _write(tmp_path, text)
    with pytest.raises(UserError) as e:
        load_config(p)
    assert f"'{key}'" in str(e.value) and str(p) in str(e.value)


def test_yaml_scalars_and_nulls(tmp_path):
    p = _write(tmp_path, "optim:\n  lr: 1e-3\n  grad_clip: null\ntrain:\n  epochs: 2.0\n  amp: no\n")
    cfg = load_config(p)
    assert cfg.optim.lr == 1e-3 and cfg.optim.grad_clip is None and cfg.train.epochs == 2
    assert cfg.train.amp == "none"


def test_overrides(tmp_path):
    p = _write(tmp_path, "data:\n  root: x\n")
    cfg = load_config(p, overrides=["optim.lr=3e-4", "data.roi_size=[32,64,64]", "train.compile=true",
                                    "model.overrides.num_global_tokens=5", "data.val_cases=[a, b]",
                                    "optim.grad_clip=null"])
    assert cfg.optim.lr == 3e-4 and cfg.data.roi_size == [32, 64, 64] and cfg.train.compile is True
    assert cfg.model.overrides == {"num_global_tokens": 5} and cfg.data.val_cases == ["a", "b"]
    assert cfg.optim.grad_clip is None
    with pytest.raises(UserError, match=r"--override 'optim.lrr=1'.*did you mean optim.lr"):
        load_config(p, overrides=["optim.lrr=1"])
    with pytest.raises(UserError, match="expected key=value"):
        load_config(p, overrides=["optim.lr"])
    with pytest.raises(UserError, match="'train.epochs'"):
        load_config(p, overrides=["train.epochs=many"])
    with pytest.raises(UserError, match="not a section"):
        load_config(p, overrides=["optim.lr.x=1"])


def test_base_inheritance_and_loops(tmp_path):
    _write(tmp_path, "optim:\n  lr: 0.5\n  momentum: 0.9\ntrain:\n  epochs: 7\n", "a.yaml")
    child = _write(tmp_path, "base: a.yaml\noptim:\n  lr: 0.1\n", "b.yaml")
    cfg = load_config(child)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.train.epochs, cfg.name) == (0.1, 0.9, 7, "b")
    _write(tmp_path, "base: y.yaml\n", "x.yaml")
    _write(tmp_path, "base: x.yaml\n", "y.yaml")
    with pytest.raises(UserError, match="loops"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(UserError, match="config file not found"):
        load_config(_write(tmp_path, "base: missing.yaml\n", "z.yaml"))


def test_bad_yaml_and_values(tmp_path):
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(_write(tmp_path, "optim: [\n"))
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    cfg = config_from_dict({"data": {"root": "d", "roi_size": [8, 8]}})
    with pytest.raises(UserError, match="data.roi_size"):
        validate_config(cfg)
    with pytest.raises(UserError, match="data.root"):
        validate_config(Config())


def test_shipped_configs_resolve_by_name(tmp_path, monkeypatch):
    from glam3d.config import config_path, shipped_configs
    monkeypatch.chdir(tmp_path)  # found through the package, not the working folder
    names = shipped_configs()
    assert "phantom_glam_nnformer_tiny" in names and len(names) == len(list(CONFIGS.glob("*.yaml")))
    assert config_path("synapse_glam_nnformer").samefile(CONFIGS / "synapse_glam_nnformer.yaml")
    assert config_path("synapse_glam_nnformer.yaml").samefile(CONFIGS / "synapse_glam_nnformer.yaml")
    assert load_config("synapse_glam_nnformer_tokens5").model.overrides["num_global_tokens"] == 5  # base: followed
    with pytest.raises(UserError, match=r"synapse_glam_nnformr: no such config .*did you mean 'synapse_glam_nnformer'"):
        config_path("synapse_glam_nnformr")
    with pytest.raises(UserError, match=r"sub/none\.yaml: config file not found"):
        config_path("sub/none.yaml")
    own = tmp_path / "synapse_glam_nnformer.yaml"  # a file the user has wins over the shipped name
    own.write_text("name: mine\n")
    assert config_path("synapse_glam_nnformer.yaml").resolve() == own


def test_configs_command_lists_and_prints(capsys):
    from glam3d.cli import main
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert any(line.startswith("synapse_nnformer ") for line in listing)
    assert main(["configs", "synapse_glam_nnformer_nonlu"]) == 0
    assert capsys.readouterr().out == (CONFIGS / "synapse_glam_nnformer_nonlu.yaml").read_text()


# ------------------------------------------------------------------------------------------------ bounded YAML
def _bomb(levels=9, width=9, anchor_key="a"):
    """A real billion-laughs document: ``width ** levels`` strings (9^9 = 387 M) in a few hundred bytes."""
    lines = [f"{anchor_key}0: &{anchor_key}0 [" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels + 1):
        lines.append(f"{anchor_key}{i}: &{anchor_key}{i} [" + ", ".join([f"*{anchor_key}{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _expanded_reference(value) -> int:
    """Nodes of a loaded YAML value as a full copy would have them (mappings: itself, keys, values)."""
    if isinstance(value, dict):
        return 1 + sum(_expanded_reference(k) + _expanded_reference(v) for k, v in value.items())
    if isinstance(value, list):
        return 1 + sum(_expanded_reference(v) for v in value)
    return 1


def test_expanded_size_counts_every_alias_copy():
    import yaml

    from glam3d.utils.bounded_yaml import expanded_size
    text = "a: &a {x: 1, y: [1, 2, &s 3]}\nb: [*a, *a, *s]\nc: &c [*a, [*a]]\nd: {k: *c}\n"
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    assert expanded_size(node) == _expanded_reference(yaml.safe_load(text))
    assert expanded_size(yaml.compose(_bomb(3, 3), Loader=yaml.SafeLoader)) == \
        _expanded_reference(yaml.safe_load(_bomb(3, 3)))


def test_billion_laughs_fails_fast_with_bounded_memory(tmp_path):
    import tracemalloc

    # model.overrides is free-form: the document would reach dataclasses.asdict (config.yaml, checkpoints) whole
    p = _write(tmp_path, _bomb() + "model:\n  overrides:\n    x: *a9\n")
    assert p.stat().st_size < 1000
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(UserError) as e:
            load_config(p)
        seconds, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(e.value) == f"{p}: YAML aliases expand to more than 100,000 values (an alias bomb?); a config needs " \
                           f"a few hundred"
    assert seconds < 5 and peak < 20e6, (seconds, peak)


def test_alias_bombs_in_a_base_file_an_override_or_a_loop(tmp_path):
    base = _write(tmp_path, _bomb(), "base.yaml")
    child = _write(tmp_path, "base: base.yaml\ntrain:\n  epochs: 2\n", "child.yaml")
    with pytest.raises(UserError, match=rf"^{base}: YAML aliases expand"):
        load_config(child)
    ok = _write(tmp_path, "data:\n  root: x\n", "ok.yaml")
    bomb = "{" + _bomb(7, 9).strip().replace("\n", ", ") + "}"
    with pytest.raises(UserError, match=r"^--override data\.val_cases: YAML aliases expand"):
        load_config(ok, overrides=[f"data.val_cases={bomb}"])
    with pytest.raises(UserError, match="contains it"):
        load_config(_write(tmp_path, "model:\n  overrides: &o {x: *o}\n", "loop.yaml"))
    # the shared budget: two bases each under the bound, together over it
    half = _write(tmp_path, "x: &x [" + ", ".join(["1"] * 300) + "]\ny: [" + ", ".join(["*x"] * 200) + "]\n",
                  "half.yaml")
    assert 50_000 < _expanded_reference(__import__("yaml").safe_load(half.read_text())) < 100_000
    with pytest.raises(UserError, match=r"aliases expand"):
        load_config(_write(tmp_path, "base: [half.yaml, half.yaml]\n", "two.yaml"))


def test_aliases_within_bounds_still_work(tmp_path):
    p = _write(tmp_path, "data:\n  root: x\n  roi_size: &r [32, 64, 64]\nval:\n  roi_size: *r\n"
                         "optim: &o {lr: 0.5}\n")
    cfg = load_config(p)
    assert cfg.data.roi_size == cfg.val.roi_size == [32, 64, 64] and cfg.optim.lr == 0.5


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_config_file(tmp_path, text):
    p = _write(tmp_path, text)
    with pytest.raises(UserError, match=rf"^{p}: config file is empty \(no settings"):
        load_config(p)


def test_empty_base_file_is_named(tmp_path):
    empty = _write(tmp_path, "", "empty.yaml")
    with pytest.raises(UserError, match=rf"^{empty}: config file is empty"):
        load_config(_write(tmp_path, "base: empty.yaml\n", "c.yaml"))


def test_oversized_binary_and_overbranched_configs(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(UserError, match=rf"^{big}: config file is 1\.9 MiB; a config is a few KB"):
        load_config(big)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(UserError, match=rf"^{binary}: config file is not UTF-8 text"):
        load_config(binary)
    _write(tmp_path, "train:\n  epochs: 2\n", "leaf.yaml")
    many = _write(tmp_path, "base: [" + ", ".join(["leaf.yaml"] * 40) + "]\n", "many.yaml")
    with pytest.raises(UserError, match=r"reach more than 32 files"):
        load_config(many)


def test_deep_nesting_is_refused(tmp_path):
    p = _write(tmp_path, "model:\n  overrides:\n    x: " + "[" * 80 + "]" * 80 + "\n")
    with pytest.raises(UserError, match=r"nested deeper than 64 levels"):
        load_config(p)
    p = _write(tmp_path, "x: " + "[" * 5000 + "]" * 5000 + "\n")  # libyaml's own limit: not valid YAML
    with pytest.raises(UserError, match=r"nested deeper|not valid YAML"):
        load_config(p)


# ------------------------------------------------------------------------------------------------ value bounds
def _tiny(tmp_path, extra=""):
    return _write(tmp_path, "model:\n  name: nnformer_tiny\ndata:\n  root: x\n  roi_size: [16, 32, 32]\n"
                            "optim:\n  name: adamw\ntrain:\n  epochs: 2\n  iters_per_epoch: 2\n" + extra)


@pytest.mark.parametrize("override, problem", [
    ("train.epochs=1000000000", r"'train\.epochs' x train\.iters_per_epoch is 2,000,000,000 iterations"),
    ("train.iters_per_epoch=0", r"'train\.iters_per_epoch' must be >= 1"),
    ("train.epochs=-3", r"'train\.epochs' must be >= 1"),
    ("train.val_every=1000000000", r"'train\.val_every' must be at most 100,000,000"),
    ("train.save_every_iters=-1", r"'train\.save_every_iters' must be in 0\.\.100,000,000"),
    ("train.save_every_iters=1000000000", r"'train\.save_every_iters' must be in 0\.\.100,000,000"),
    ("optim.lr=.inf", r"'optim\.lr' must be a finite number, got inf"),
    ("optim.grad_clip=.inf", r"'optim\.grad_clip' must be a finite number"),
    ("optim.betas=[0.9, .nan]", r"'optim\.betas\[1\]' must be a finite number"),
    ("optim.warmup_epochs=-1", r"'optim\.warmup_epochs' must be >= 0"),
    ("data.batch_size=100000", r"'data\.batch_size' must be at most 4096"),
    ("data.workers=100000", r"'data\.workers' must be at most 256"),
    ("val.sw_batch_size=0", r"'val\.sw_batch_size' must be in 1\.\.4096"),
    ("val.max_cases=-1", r"'val\.max_cases' must be >= 0"),
    ("data.roi_size=[0,32,32]", r"'data\.roi_size' must be 3 positive sizes"),
    ("data.roi_size=[16,32,100000]", r"'data\.roi_size' \[16, 32, 100000\] is far larger than any scan"),
    ("val.roi_size=[0,32,32]", r"'val\.roi_size' must be 3 positive sizes"),
    ("data.roi_size=[24,32,32]", r"'data\.roi_size' \[24, 32, 32\] must be divisible by the network's "
                                 r"\(16, 32, 32\) .* e\.g\. \[32, 32, 32\]"),
    ("val.roi_size=[16,32,48]", r"'val\.roi_size' \[16, 32, 48\] must be divisible"),
    ("data.batch_size=4096", r"'data\.batch_size' x the patches x window makes 4,294,967,296 voxels a step"),
])
def test_absurd_values_refused_naming_key_and_file(tmp_path, override, problem):
    p = _tiny(tmp_path)
    cfg = load_config(p, overrides=[override] + (["data.roi_size=[64,128,128]"] if "4096" in override else []))
    with pytest.raises(UserError, match=problem) as e:
        validate_config(cfg)
    assert str(e.value).startswith(f"{p}: config key '") and "\n" not in str(e.value)


def test_network_beyond_memory_refused_fast_without_building(tmp_path, monkeypatch):
    from glam3d.models import registry

    built = []
    real = registry.build_model
    monkeypatch.setattr(registry, "build_model",
                        lambda *a, **k: (built.append(torch.get_default_device().type), real(*a, **k))[1])
    cfg = load_config(_tiny(tmp_path), overrides=["model.overrides.embed_dim=65536"])
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        validate_config(cfg)
    assert time.perf_counter() - t0 < 5 and built == ["meta"]
    assert re.match(rf"^{tmp_path / 'c.yaml'}: config key 'model': nnformer_tiny \(17\.4 T parameters\) needs "
                    r"[\d.]+ TiB for its weights, gradients and adamw state alone, but this machine has [\d.]+ \w+ "
                    r"of memory$", str(e.value)), str(e.value)
    cfg = load_config(_tiny(tmp_path), overrides=["model.overrides.depths=[2,2,100000,2]"])
    with pytest.raises(UserError, match=r"'model\.overrides': depths=.* 100,006 transformer blocks"):
        validate_config(cfg)


def test_validate_checks_the_memory_against_the_training_device(tmp_path, monkeypatch):
    from glam3d.engine import preflight

    cfg = load_config(_tiny(tmp_path))
    need = preflight.training_bytes(preflight.meta_network("nnformer_tiny"), cfg.optim)
    monkeypatch.setattr(preflight, "machine_memory", lambda device="cpu": (need, "this machine has"))
    validate_config(cfg)
    monkeypatch.setattr(preflight, "machine_memory", lambda device="cpu": (need - 1, "this machine has"))
    with pytest.raises(UserError, match="needs 36.8 MiB for its weights, gradients and adamw state alone"):
        validate_config(cfg)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # four CPU ranks on one machine: four copies
    monkeypatch.setattr(preflight, "machine_memory", lambda device="cpu": (3 * need, "this machine has"))
    with pytest.raises(UserError, match="adamw state in 4 processes alone"):
        validate_config(cfg)
    validate_config(cfg, network=False)


def test_custom_factories_and_recipes_skip_the_network_check(tmp_path):
    cfg = load_config(_tiny(tmp_path), overrides=["model.name=mypkg.nets:Net", "data.roi_size=[24,32,32]"])
    validate_config(cfg)  # the trainer builds it (it needs the dataset's classes and channels)
    cfg = load_config(_tiny(tmp_path), overrides=["model.overrides.wings=3"])
    validate_config(cfg)  # a network that does not build is left to the trainer's own error
