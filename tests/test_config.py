"""Config files: YAML -> dataclasses, strict keys and types (one-line errors naming key and file), ``base:``
inheritance, ``--override`` parsing, and the shipped experiment configs."""
from __future__ import annotations

from pathlib import Path

import pytest

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
