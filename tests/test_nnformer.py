"""nnFormer / GLAM-nnFormer networks, SwinUNETR baseline, complexity table and `glam3d models`."""
import argparse

import pytest
import torch

from glam3d.models import build_model, build_model_spec, check_model_spec, list_models, parse_model_spec
from glam3d.models.complexity import (build_meta, count_macs, count_macs_by_name, count_parameters, format_table,
                                      model_table)

torch.set_num_threads(1)


def _meta(name, **kw):
    with torch.device("meta"):
        return build_model(name, **kw)


def test_registry_names():
    names = list_models()
    for n in ["nnformer_synapse", "nnformer_tiny", "glam_nnformer_synapse", "glam_nnformer_tiny",
              "swin_unetr_synapse", "swin_unetr_tiny"]:
        assert n in names


def test_nnformer_synapse_params_and_macs():
    """Official Synapse nnFormer: 149.5 M parameters (the deployed, single-head network) and 211.5 G MACs."""
    m = _meta("nnformer_synapse")
    assert (m.spatial_dims, m.in_channels, m.num_classes, m.default_crop) == (3, 1, 14, (64, 128, 128))
    assert m.deep_supervision
    n_ds = count_parameters(m)
    n = count_parameters(_meta("nnformer_synapse", deep_supervision=False))
    assert abs(n / 149.5e6 - 1) < 0.02, n
    assert abs(n_ds / 149.5e6 - 1) < 0.02, n_ds  # + the two extra deep-supervision heads
    macs = count_macs(m, (1, 1, 64, 128, 128))
    assert abs(macs / 211.5e9 - 1) < 0.03, macs
    assert m.glam3d_spec["name"] == "nnformer_synapse" and m.glam3d_spec["version"] == 2
    assert m.glam3d_spec["kwargs"]["embed_dim"] == 192 and m.glam3d_spec["kwargs"]["num_global_tokens"] == 0


def test_glam_nnformer_synapse_builds():
    m = _meta("glam_nnformer_synapse")
    # stages 3-4 (8^3 map / window 8, 4^3 / 4) are one window: global tokens there too (learned memory), every
    # encoder stage and decoder level a GLAM layer with G-MSA; skipping them stays an option
    assert m.single_window == [False, False, True, True]
    assert m.num_global_tokens == [10, 10, 10, 10] and m.glam_variant == "authors"
    assert all(s.num_global_tokens == 10 and s.use_gmsa for s in list(m.stages) + list(m.dec_stages))
    assert _meta("glam_nnformer_synapse", glam_single_window=False).num_global_tokens == [10, 10, 0, 0]
    # G-MSA adds parameters; the attention-only NLU has fewer than the transposed-conv patch expanding it
    # replaces, the authors' NLU block (patch-expanding residual, MLP) more
    no_nlu = count_parameters(_meta("glam_nnformer_synapse", nlu=False))
    assert no_nlu > count_parameters(_meta("nnformer_synapse"))
    assert count_parameters(_meta("glam_nnformer_synapse", nlu_form="attention")) < no_nlu < count_parameters(m)


@pytest.mark.parametrize("name", ["nnformer_tiny", "glam_nnformer_tiny"])
def test_tiny_forward_backward(name):
    torch.manual_seed(0)
    m = build_model(name)
    assert m.default_crop == (32, 64, 64) and m.num_classes == 9
    x = torch.randn(2, 1, *m.default_crop)
    m.train()
    outs = m(x)
    assert isinstance(outs, list) and len(outs) == 3
    assert [tuple(o.shape) for o in outs] == [(2, 9, 32, 64, 64), (2, 9, 16, 32, 32), (2, 9, 8, 16, 16)]
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
    m.eval()
    with torch.no_grad():
        y = m(x[:1])
    assert y.shape == (1, 9, 32, 64, 64)
    m2 = build_model(name, deep_supervision=False).train()
    with torch.no_grad():
        assert m2(x[:1]).shape == (1, 9, 32, 64, 64)


def test_glam_switches():
    base = count_parameters(build_model("nnformer_tiny"))
    vanilla_twin = build_model("glam_nnformer_tiny", num_global_tokens=0, nlu=False)
    assert count_parameters(vanilla_twin) == base
    assert set(vanilla_twin.state_dict()) == set(build_model("nnformer_tiny").state_dict())
    full = build_model("glam_nnformer_tiny")
    no_nlu = build_model("glam_nnformer_tiny", nlu=False)
    no_gmsa = build_model("glam_nnformer_tiny", gmsa=False, nlu=False)
    assert any(".nlu." in k for k in full.state_dict()) and not any(".nlu." in k for k in no_nlu.state_dict())
    assert any(".gmsa." in k for k in no_nlu.state_dict()) and not any(".gmsa." in k for k in no_gmsa.state_dict())
    assert any("global_tokens" in k for k in no_gmsa.state_dict())
    assert count_parameters(no_gmsa) < count_parameters(no_nlu)
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        for m in (no_nlu.eval(), no_gmsa.eval()):
            assert m(x).shape == (1, 9, 32, 64, 64)
    per_stage = build_model("glam_nnformer_tiny", num_global_tokens=[4, 2, 0, 0], global_pos_embed=True,
                            global_clamp=True)
    assert per_stage.stages[0].num_global_tokens == 4 and per_stage.dec_stages[1].num_global_tokens == 2
    with torch.no_grad():
        assert per_stage.eval()(x).shape == (1, 9, 32, 64, 64)


def test_global_num_heads_changes_only_gmsa():
    """``global_num_heads`` splits G-MSA's attention differently: same parameters (the same state dict loads),
    same multiply-adds, a different function; the window blocks do not see it (with G-MSA off the outputs are
    equal)."""
    torch.manual_seed(0)
    a = build_model("glam_nnformer_tiny").eval()
    b = build_model("glam_nnformer_tiny", global_num_heads=[1, 2, 4, 8]).eval()
    # sharper G-MSA attention than at initialisation (nearly uniform there, whatever the heads)
    sd = {k: v * 30 if ".gmsa." in k and k.endswith("qkv.weight") else v for k, v in a.state_dict().items()}
    a.load_state_dict(sd)
    b.load_state_dict(sd)  # strict: same keys and shapes
    assert [g.attn.num_heads for g in b.stages[0].gmsa] == [1, 1] and b.stages[1].gmsa[0].attn.num_heads == 2
    assert b.dec_stages[0].gmsa[0].attn.num_heads == 1 and a.stages[0].gmsa[0].attn.num_heads == 2
    assert all(blk.attn.num_heads == 2 for blk in b.stages[0].blocks)  # W-MSA keeps num_heads
    shape = (1, 1, 32, 64, 64)
    assert count_macs(_meta("glam_nnformer_tiny", global_num_heads=[1, 2, 4, 8]), shape) == \
        count_macs(_meta("glam_nnformer_tiny"), shape)
    x = torch.randn(shape)
    with torch.no_grad():
        assert (a(x) - b(x)).abs().max() > 1e-4
        c = build_model("glam_nnformer_tiny", gmsa=False).eval()
        d = build_model("glam_nnformer_tiny", gmsa=False, global_num_heads=1).eval()
        d.load_state_dict(c.state_dict())
        torch.testing.assert_close(c(x), d(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="global_num_heads\\[0\\]=5 must divide the stage dim 24"):
        build_model("glam_nnformer_tiny", global_num_heads=5)
    with pytest.raises(ValueError, match="global_num_heads"):
        build_model("glam_nnformer_tiny", global_num_heads=[1, 2])


def test_model_specs():
    """``NAME:key=value`` specs (``glam3d bench --models``): YAML values, errors that name the spec."""
    assert parse_model_spec("glam_nnformer_tiny") == ("glam_nnformer_tiny", {})
    assert parse_model_spec("glam_nnformer_tiny:global_num_heads=[1,2,4,8]:nlu=false") == \
        ("glam_nnformer_tiny", {"global_num_heads": [1, 2, 4, 8], "nlu": False})
    m = build_model_spec("glam_nnformer_tiny:num_global_tokens=4")
    assert m.num_global_tokens == [4, 4, 4, 4] and m.glam3d_spec["kwargs"]["num_global_tokens"] == 4
    assert check_model_spec("glam_nnformer_synapse:global_num_heads=[3,6,12,24]").startswith("glam_nnformer")
    for spec, msg in (("glam_nnformer_tiny:nosuch=1", "unexpected keyword"), ("glam_nnformer_tiny:nlu", "key=value"),
                      ("glam_nnformer_tiny:global_num_heads=7", "global_num_heads"),
                      ("glam_nnformer_tiny:nlu=[", "unreadable"), ("nosuchnet_tiny:nlu=false", "unknown model")):
        with pytest.raises(ValueError, match=msg):
            check_model_spec(spec)


def test_vanilla_twin_equals_nnformer_output():
    torch.manual_seed(0)
    a = build_model("nnformer_tiny").eval()
    b = build_model("glam_nnformer_tiny", num_global_tokens=0, nlu=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))


def test_bad_inputs_and_arguments():
    m = build_model("nnformer_tiny").eval()
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 1, 30, 64, 64))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="in_channels"):
        m(torch.randn(1, 2, 32, 64, 64))
    with pytest.raises(ValueError, match="num_heads"):
        build_model("nnformer_tiny", num_heads=(5, 4, 8, 16))
    with pytest.raises(ValueError, match="crop_size"):
        build_model("nnformer_tiny", crop_size=(30, 64, 64))
    with pytest.raises(ValueError, match="window_size"):
        build_model("nnformer_tiny", window_size=(4, 4, 4))
    with pytest.raises(ValueError, match="nlu"):
        build_model("nnformer_tiny", nlu=True)


def test_other_input_sizes():
    m = build_model("glam_nnformer_tiny", global_pos_embed=True).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 1, 16, 64, 96)).shape == (1, 9, 16, 64, 96)


def test_swin_unetr_tiny():
    pytest.importorskip("einops")
    m = build_model("swin_unetr_tiny").eval()
    assert not m.deep_supervision and m.default_crop == (32, 64, 64)
    with torch.no_grad():
        assert m(torch.randn(1, 1, 32, 64, 64)).shape == (1, 9, 32, 64, 64)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(1, 1, 32, 64, 48))


def test_model_table_and_command(capsys):
    rows = model_table(["nnformer_tiny", "glam_nnformer_tiny"])
    assert [r["name"] for r in rows] == ["nnformer_tiny", "glam_nnformer_tiny"]
    assert rows[0]["twin"] is None and rows[1]["twin"] == "nnformer_tiny"
    assert rows[1]["params_overhead_pct"] != 0 and rows[1]["macs_overhead_pct"] > 0
    assert rows[0]["macs_G"] == pytest.approx(count_macs_by_name("nnformer_tiny") / 1e9)
    assert "glam_nnformer_tiny" in format_table(rows)
    with pytest.raises(ValueError, match="names"):
        model_table(["nope"])
    from glam3d.commands import models as cmd
    parser = argparse.ArgumentParser()
    cmd.add_parser(parser.add_subparsers())
    assert cmd.run(parser.parse_args(["models", "--names", "nnformer_tiny"])) == 0
    assert "nnformer_tiny" in capsys.readouterr().out


def test_markdown_model_table_is_the_command_output(capsys):
    """``glam3d models --markdown`` (the README's table) prints, per row, the parameters and MACs counted here
    directly, for registered names and for specs with options; the overheads are over the vanilla twin."""
    from glam3d.models.complexity import markdown_table
    from glam3d.commands import models as cmd
    names = ["nnformer_tiny", "glam_nnformer_tiny", "glam_nnformer_tiny:glam_variant=paper"]
    parser = argparse.ArgumentParser()
    cmd.add_parser(parser.add_subparsers())
    assert cmd.run(parser.parse_args(["models", "--markdown", "--names", *names])) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == markdown_table(names)
    lines = printed.splitlines()
    assert lines[0].startswith("| model |") and len(lines) == 2 + len(names)
    cells = {ln.split("|")[1].strip().strip("`"): [c.strip() for c in ln.split("|")[2:-1]] for ln in lines[2:]}
    base = _meta("nnformer_tiny")
    p0, m0 = count_parameters(base), count_macs(base, (1, 1, 32, 64, 64))
    for name in names:
        net = build_meta(name)
        p, m = count_parameters(net), count_macs(net, (1, 1, 32, 64, 64))
        crop, params, macs, over = cells[name]
        assert crop == "32×64×64" and params == f"{p / 1e6:.2f}" and macs == f"{m / 1e9:.2f}"
        if name == "nnformer_tiny":
            assert over == ""
        else:
            assert over == f"{100 * (p - p0) / p0:+.2f} % params, {100 * (m - m0) / m0:+.2f} % MACs (`nnformer_tiny`)"
    with pytest.raises(ValueError, match="unknown model"):
        model_table(["nosuch_tiny:nlu=false"])


@pytest.mark.parametrize("name", ["nnformer_tiny", "glam_nnformer_tiny"])
def test_cpu_inference_paths_equal_autograd_path(name, monkeypatch):
    """CPU inference takes the memory-lean paths — window attention and MLPs in chunks of tokens (forced small
    here), the last patch merging as one GEMM (its weight dwarfs its map), skips freed once used — and gives the
    logits of the plain autograd path."""
    from glam3d.models import layers
    from glam3d.models.networks import nnformer as nnf
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(2, 1, 32, 64, 64)
    ref = model(x)
    assert ref.requires_grad  # the reference ran with autograd: none of the inference paths
    monkeypatch.setattr(layers, "CHUNK_TOKENS", 100)
    gemm = []
    monkeypatch.setattr(nnf, "conv_as_gemm", lambda *a: gemm.append(1) or layers.conv_as_gemm(*a))
    with torch.inference_mode():
        y = model(x)
    assert gemm == [1]  # the last merging (96 -> 192 channels onto 2^3 voxels); the others stay convolutions
    torch.testing.assert_close(y, ref.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_one_channel_input_viewed_channels_last_changes_no_output(amp, monkeypatch):
    """The stem sees a one-channel CPU image through channels-last strides (the same memory, no copy) so that
    oneDNN writes the first convolution's output channels-last: the network's outputs are bit-identical to
    those from the plain strides, in float32 and under bf16 autocast; other inputs are left as they are."""
    from glam3d.models.networks import nnformer as nnf
    x = torch.randn(2, 1, 16, 32, 32)
    v = nnf._channels_last_input(x)
    assert v.data_ptr() == x.data_ptr() and torch.equal(v, x)
    assert v.is_contiguous(memory_format=torch.channels_last_3d) and v.stride(1) == 1 and x.stride(1) != 1
    multi = torch.randn(1, 2, 4, 4, 4)
    assert nnf._channels_last_input(multi) is multi
    torch.manual_seed(0)
    model = build_model("glam_nnformer_tiny").eval()
    x = torch.randn(1, 1, 32, 64, 64)

    def run():
        with torch.inference_mode(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            return model(x)
    y = run()
    monkeypatch.setattr(nnf, "_channels_last_input", lambda t: t)
    assert torch.equal(y, run())


def test_build_meta_counts_a_spec_like_the_real_network():
    """The bench counts on the meta device (no weights made): a spec with options counts as the real build does."""
    from glam3d.models.complexity import build_meta
    spec = "glam_nnformer_tiny:num_global_tokens=4"
    meta, real = build_meta(spec), build_model_spec(spec)
    assert next(meta.parameters()).device.type == "meta"
    shape = (1, 1, *real.default_crop)
    assert count_parameters(meta) == count_parameters(real)
    assert count_macs(meta, shape) == count_macs(real, shape)
    assert count_macs(meta, shape) < count_macs(build_meta("glam_nnformer_tiny"), shape)  # the option took effect
