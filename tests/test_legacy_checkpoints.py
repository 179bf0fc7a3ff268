"""Model specs that rebuild the trained network whatever the defaults become.

A network records every constructor argument with its resolved value and a spec version (``glam3d_spec``, a
checkpoint's ``model_spec``); a checkpoint without a version predates that and is rebuilt with the defaults of its
time. The fixtures in ``tests/data/legacy`` are real checkpoints written by glam3d before spec version 2
(``tests/data/README.md``), each with that code's output on a seeded input: today's code must reproduce it.
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch

from glam3d.engine.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from glam3d.errors import UserError
from glam3d.models import build_model, families
from glam3d.models import registry
from glam3d.models.networks.nnformer import NnFormer

LEGACY = Path(__file__).parent / "data" / "legacy"
#: fixture -> options it was built with by default then, which differ from today's
FIXTURES = {
    "glam_nnformer_tiny": dict(glam_variant="paper", nlu_form="attention", glam_single_window=False,
                               global_pos_embed=False),
    "glam_swin_unet_tiny": dict(glam_variant="paper", nlu_form="attention", global_pos_embed=False),
    "glam_swin_upernet_tiny": dict(glam_variant="paper", global_pos_embed=False),
    "swin_unet_tiny_nlu": dict(nlu_form="attention"),
    "nnformer_tiny": {},
}
#: 2D fixtures -> their GLAM levels (Swin-Unet: 4 encoder stages + 3 decoder levels; UperNet: 4 backbone stages)
TRAILING_GMSA = {"glam_swin_unet_tiny": 7, "glam_swin_upernet_tiny": 4}


def _forward(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _load(stem):
    path = LEGACY / f"{stem}.pt"
    return path, load_checkpoint(path)


@pytest.mark.parametrize("stem", sorted(FIXTURES))
def test_legacy_checkpoint_reproduces_the_old_output(stem, capsys):
    path, state = _load(stem)
    assert "version" not in state["model_spec"]  # a checkpoint as the old code wrote it
    model = model_from_checkpoint(state, path)
    ref = state["reference"]
    out = _forward(model, ref["input"])
    assert out.dtype == torch.float32 and torch.equal(out, ref["output"])
    spec = model.glam3d_spec
    assert spec["version"] == registry.SPEC_VERSION
    assert {k: spec["kwargs"][k] for k in FIXTURES[stem]} == FIXTURES[stem]
    err = capsys.readouterr().err
    if stem == "nnformer_tiny":  # vanilla: nothing assumed that matters, nothing said
        assert err == ""
        return
    lines = err.splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "predates model spec version 2" in lines[0]
    assert all(f"{k}={v!r}" in lines[0] for k, v in FIXTURES[stem].items())


@pytest.mark.parametrize("stem,levels", sorted(TRAILING_GMSA.items()))
def test_legacy_2d_drops_exactly_the_gmsa_after_each_levels_last_block(stem, levels, capsys):
    """The weights left out are those of the highest-numbered G-MSA of every GLAM level (one per level, after its
    last block), read off the checkpoint's own keys; reproducing the old output with them gone (test above) shows
    they were dead."""
    path, state = _load(stem)
    model = model_from_checkpoint(state, path)
    per_level: dict = {}
    for key in state["model"]:
        m = re.match(r"(.+)\.gmsa\.(\d+)\.", key)
        if m:
            per_level.setdefault(m.group(1), set()).add(int(m.group(2)))
    last = {key for key in state["model"] for level, idx in per_level.items()
            if key.startswith(f"{level}.gmsa.{max(idx)}.")}
    assert len(per_level) == levels and last
    assert set(state["model"]) - set(model.state_dict()) == last
    assert set(model.state_dict()) <= set(state["model"])
    assert f"{len(last)} tensors of the G-MSA" in capsys.readouterr().err


@pytest.mark.parametrize("stem", [s for s in sorted(FIXTURES) if FIXTURES[s]])
def test_todays_defaults_do_not_fit_a_legacy_checkpoint(stem):
    """Without the legacy options the fixture does not load: they are what makes the tests above pass."""
    path, state = _load(stem)
    model = build_model(state["model_spec"]["name"], **state["model_spec"]["kwargs"])
    own, saved = model.state_dict(), state["model"]
    fits = set(own) == set(saved) and all(own[k].shape == saved[k].shape for k in own)
    assert not fits


def test_legacy_checkpoint_that_does_not_fit_names_the_assumed_defaults(tmp_path):
    path, state = _load("glam_nnformer_tiny")
    state["model"] = {k: v for k, v in state["model"].items() if ".gmsa." not in k}
    bad = tmp_path / "cut.pt"
    save_checkpoint(bad, state)
    with pytest.raises(UserError, match=r"missing keys.*no version.*glam_variant='paper'") as err:
        model_from_checkpoint(load_checkpoint(bad), bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------------
# version-2 specs
# ---------------------------------------------------------------------------------------------------------------
SMALL = dict(num_classes=3, crop_size=(8, 16, 16), embed_dim=4, depths=(2, 2, 2), num_heads=(1, 1, 2),
             window_size=(2, 2, 1), deep_supervision=False)


def _constructor_parameters(cls) -> set:
    return set(list(inspect.signature(cls.__init__).parameters)[1:])


def test_a_new_checkpoint_round_trips_its_full_spec(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_model("glam_nnformer_tiny", **SMALL)
    spec = model.glam3d_spec
    assert spec["version"] == 2 and set(spec) == {"name", "version", "kwargs"}
    assert set(spec["kwargs"]) == _constructor_parameters(NnFormer)
    # the resolved values: the overrides, GLAM-nnFormer's builder defaults, the size table, the class defaults
    kw = spec["kwargs"]
    assert kw["embed_dim"] == 4 and kw["depths"] == [2, 2, 2] and kw["num_global_tokens"] == 10 and kw["nlu"]
    assert kw["drop_path_rate"] == 0.1 and kw["glam_variant"] == "authors" and kw["global_pos_embed"] is True
    assert json.loads(json.dumps(spec)) == spec  # plain data (a JSON manifest or YAML keeps it as it is)
    save_checkpoint(tmp_path / "ck.pt", {"model_spec": spec, "model": model.state_dict()})
    state = load_checkpoint(tmp_path / "ck.pt")
    assert state["model_spec"] == spec
    rebuilt = model_from_checkpoint(state, tmp_path / "ck.pt")
    assert rebuilt.glam3d_spec == spec
    x = torch.randn(1, 1, 8, 16, 16)
    assert torch.equal(_forward(rebuilt, x), _forward(model, x))
    assert capsys.readouterr().err == ""


def test_changing_a_default_does_not_change_what_a_checkpoint_rebuilds(tmp_path, monkeypatch):
    """After a checkpoint is saved, the class defaults, GLAM-nnFormer's builder defaults and the size table all
    change; the checkpoint still rebuilds the network it was saved from, while a fresh build follows the change."""
    torch.manual_seed(0)
    model = build_model("glam_nnformer_tiny", **SMALL)
    save_checkpoint(tmp_path / "ck.pt", {"model_spec": model.glam3d_spec, "model": model.state_dict()})

    real_init = NnFormer.__init__

    def init(self, *args, glam_variant="paper", nlu_form="attention", global_pos_embed=False, **kwargs):
        real_init(self, *args, glam_variant=glam_variant, nlu_form=nlu_form, global_pos_embed=global_pos_embed,
                  **kwargs)

    monkeypatch.setattr(NnFormer, "__init__", init)
    from glam3d.models.networks import nnformer
    monkeypatch.setitem(nnformer.GLAM_DEFAULTS, "num_global_tokens", 3)
    fam = registry.families()["glam_nnformer"]
    monkeypatch.setitem(fam.sizes, "tiny", dict(fam.sizes["tiny"], mlp_ratio=2.0, drop_path_rate=0.3))

    fresh = build_model("glam_nnformer_tiny", **SMALL)  # the patches took effect
    assert fresh.glam_variant == "paper" and fresh.num_global_tokens[0] == 3
    assert fresh.glam3d_spec["kwargs"]["mlp_ratio"] == 2.0

    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "ck.pt"), tmp_path / "ck.pt")  # strict load
    assert rebuilt.glam_variant == "authors" and rebuilt.num_global_tokens[0] == 10
    assert rebuilt.glam3d_spec == model.glam3d_spec
    x = torch.randn(1, 1, 8, 16, 16)
    assert torch.equal(_forward(rebuilt, x), _forward(model, x))


def _every_family_default():
    return [pytest.param(name, f"{name}_{fam.default_size or sorted(fam.sizes)[0]}", id=name)
            for name, fam in sorted(families().items()) if fam.builder.__module__.startswith("glam3d.")]


@pytest.mark.parametrize("family,variant", _every_family_default())
def test_every_registered_network_records_all_its_arguments(family, variant):
    """A family whose network class does not record its arguments (``registry.records_arguments``) would save
    specs that a later default change alters: every registered family records every constructor argument."""
    try:
        with torch.device("meta"):
            model = build_model(variant)
    except ImportError as err:  # an optional dependency (SwinUNETR: einops)
        pytest.skip(str(err))
    except RuntimeError:  # MONAI's SwinUNETR computes with tensors while it builds: build a small one for real
        model = build_model(variant, feature_size=12, num_heads=(1, 1, 1, 1), crop_size=(32, 32, 32))
    spec = model.glam3d_spec
    assert spec["version"] == 2 and set(spec["kwargs"]) == _constructor_parameters(type(model))
    assert json.loads(json.dumps(spec)) == spec
    try:
        with torch.device("meta"):
            again = registry.build_from_spec(spec)
    except RuntimeError:  # (SwinUNETR, as above)
        again = registry.build_from_spec(spec)
    assert again.glam3d_spec == spec
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_a_spec_from_a_newer_glam3d_is_refused_in_one_line(tmp_path):
    model = build_model("nnformer_tiny", **SMALL)
    spec = dict(model.glam3d_spec, version=registry.SPEC_VERSION + 1)
    save_checkpoint(tmp_path / "new.pt", {"model_spec": spec, "model": model.state_dict()})
    with pytest.raises(UserError, match="newer than this glam3d reads") as err:
        model_from_checkpoint(load_checkpoint(tmp_path / "new.pt"), tmp_path / "new.pt")
    assert str(tmp_path / "new.pt") in str(err.value)


def test_legacy_position_option_is_named_as_computing_differently(tmp_path, capsys):
    """A checkpoint from before spec version 2 trained with ``global_pos_embed=True``: that code added the position
    into the global tokens themselves, today's adds it to G-MSA's attention input only. Its weights fit (same
    table), so it loads, and the note says the outputs differ."""
    overrides = dict(SMALL, num_global_tokens=2, glam_variant="paper", nlu_form="attention",
                     glam_single_window=False, global_pos_embed=True)
    model = build_model("glam_nnformer_tiny", **overrides)
    legacy_kwargs = {k: v for k, v in overrides.items() if k not in ("glam_variant", "nlu_form",
                                                                      "glam_single_window")}
    save_checkpoint(tmp_path / "pos.pt", {"model_spec": {"name": "glam_nnformer_tiny", "kwargs": legacy_kwargs},
                                          "model": model.state_dict()})
    rebuilt = model_from_checkpoint(load_checkpoint(tmp_path / "pos.pt"), tmp_path / "pos.pt")
    assert rebuilt.glam3d_spec["kwargs"]["global_pos_embed"] is True
    (line,) = capsys.readouterr().err.splitlines()
    assert "global_pos_embed=True" in line and "outputs differ" in line


def test_a_run_saved_before_spec_version_2_resumes(tmp_path):
    """A training run whose checkpoints predate spec version 2 (their spec records only the config's overrides, and
    the defaults of that time were the legacy options) resumes: the network is rebuilt with the options it was
    trained with, the note says so, and the run's config.yaml records them."""
    import tiny_training as T
    import yaml

    from glam3d.config import config_from_dict
    from glam3d.engine.train import train

    data = T.make_dataset(tmp_path / "data")
    run = tmp_path / "run"
    legacy = FIXTURES["glam_nnformer_tiny"]
    sections = dict(data={"roi_size": [16, 32, 32], "batch_size": 1},
                    train={"epochs": 1, "iters_per_epoch": 2, "val_every": 0})
    trained_then = T.tiny_config(data, run, model={"name": "glam_nnformer_tiny", "overrides": dict(legacy)},
                                 **sections)
    train(config_from_dict(trained_then), console=False)
    # what glam3d wrote before spec version 2: the spec holds the build's overrides only (the legacy options were
    # the defaults, so no config named them) and no version
    for name in ("last.pt", "last.pt.prev"):
        path = run / "checkpoints" / name
        if path.is_file():
            state = load_checkpoint(path)
            kept = {k: state["model_spec"]["kwargs"][k] for k in ("num_classes",)}
            state["model_spec"] = {"name": "glam_nnformer_tiny", "kwargs": kept}
            torch.save(state, path)
    today = T.tiny_config(data, run, model={"name": "glam_nnformer_tiny", "overrides": {}},
                          **{**sections, "train": {**sections["train"], "epochs": 2}})
    summary = train(config_from_dict(today), resume=True, console=False)
    assert summary["iterations"] == 4
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: saved["model"]["overrides"][k] for k in legacy} == legacy
    assert "predates model spec version 2" in (run / "train.log").read_text()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["model_spec"]["version"] == 2
