"""Precision policy of inference: which autocast dtype on which device, and weights cast once for it.

* :func:`resolve_amp`: the user's ``amp`` choice (``auto``, ``off``, ``bf16``, ``fp16``) as an autocast dtype on a
  device (``auto``: bf16 on GPUs that support it, else fp16; float32 on a CPU).
* :func:`cpu_bf16_native`: whether this CPU computes bf16 natively (where bf16 on a CPU is worth choosing).
* :func:`autocast_to`: ``torch.autocast`` to a dtype, or switched off for float32.
* :func:`inference_weights` / :func:`cast_off_the_map`: the linear and convolution weights stored in the autocast
  dtype once instead of cast at every forward (bit-identical outputs), and no tensor left on a mapped checkpoint.

Example::

    amp = resolve_amp("bf16", "cpu")                     # torch.bfloat16
    model = inference_weights(model.eval(), amp)
    with torch.no_grad(), autocast_to("cpu", amp):
        logits = model(x)
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch

__all__ = ["resolve_amp", "cpu_bf16_native", "autocast_to", "inference_weights", "cast_off_the_map"]


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 natively in oneDNN (AVX512-BF16 or AMX: Intel Cooper Lake / Sapphire Rapids
    and later, AMD Zen 4 and later). Elsewhere bf16 autocast on the CPU is emulated and slower than float32."""
    check = getattr(getattr(torch.ops, "mkldnn", None), "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None and torch.backends.mkldnn.is_available() else False
    except RuntimeError:
        return False


def autocast_to(device, amp: Optional[torch.dtype], cache: bool = True):
    """``torch.autocast`` on ``device``'s type to ``amp`` (None: float32 — autocast switched *off*, also when the
    caller had it on). ``cache=False``: no weight-cast cache (required inside a CUDA-graph capture, whose casts
    would be freed after it)."""
    return torch.autocast(torch.device(device).type, dtype=amp or torch.float32, enabled=amp is not None,
                          cache_enabled=cache)


#: layers whose weights ``torch.autocast`` casts at every call, and :func:`inference_weights` casts once
_CAST_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d,
                torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)


def inference_weights(model: torch.nn.Module, amp: Optional[torch.dtype]) -> torch.nn.Module:
    """Store the weights and biases of ``model``'s linear and convolution layers in ``amp``'s dtype, in place,
    for inference under ``torch.autocast`` to ``amp`` (None or float32: nothing changes). Returns ``model``.

    Autocast casts those weights at every call: 150 M parameters per forward of a Synapse-size network, after
    which oneDNN copies every 3D convolution weight to the channels-last layout of its input again (3D weights
    are stored in that layout here). Casting once is the same rounding, so the outputs are bit-identical to
    autocast's, the weights take half the memory, and a bf16 forward on a CPU with AMX runs 10-25 % faster.
    Other parameters (norms, position-bias tables, global tokens) stay float32, as autocast uses them. The
    float32 weights are gone: the model is for inference under autocast only (a forward without it fails on the
    dtype mismatch).

    Example::

        model = inference_weights(build_model_spec("glam_nnformer_synapse").eval(), torch.bfloat16)
        labels = predict_volume(model, ct, (64, 128, 128), amp="bf16")
    """
    if amp is None or amp == torch.float32:
        return model
    for mod in model.modules():
        if not isinstance(mod, _CAST_LAYERS):
            continue
        for name in ("weight", "bias"):
            p = getattr(mod, name, None)
            if p is None or not p.is_floating_point() or p.dtype == amp:
                continue
            t = p.detach().to(amp)
            if t.ndim == 5:
                t = t.contiguous(memory_format=torch.channels_last_3d)
            p.data = t
    return model


def resolve_amp(amp, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype for ``amp`` on ``device`` (``None``: float32).

    ``None``/``"auto"``/``True``: bf16 on a CUDA GPU that supports it, else fp16; float32 on CPU (bf16 on a CPU
    is the user's choice: faster where :func:`cpu_bf16_native`, never bit-equal to float32).
    ``False``/``"off"``/``"none"``/``"fp32"``: float32. ``"bf16"``/``"bfloat16"``: bf16 on any device.
    ``"fp16"``/``"float16"``: CUDA only (ValueError on CPU, where fp16 autocast is slow and unscaled).
    """
    device = torch.device(device)
    if amp is None or amp is True or (isinstance(amp, str) and amp.lower() == "auto"):
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp is False or (isinstance(amp, str) and amp.lower() in ("off", "none", "false", "no", "fp32")):
        return None
    key = str(amp).lower().replace("torch.", "")
    dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "half": torch.float16}.get(key)
    if dtype is None:
        raise ValueError(f"amp must be one of auto, off, bf16, fp16; got {amp!r}")
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("fp16 autocast is a GPU path; on a CPU use bf16 (fast where the CPU has AVX512-BF16 or "
                         "AMX) or off")
    return dtype


def cast_off_the_map(model: torch.nn.Module, amp: torch.dtype) -> torch.nn.Module:
    """CPU inference under ``amp`` autocast of a network whose weights are a mapped checkpoint's pages
    (``load_checkpoint(mmap=True)`` + ``assign=True``): the linear and convolution weights cast once
    (:func:`inference_weights`) and every other parameter and buffer (norms, bias tables: a few MB) copied, so
    that no tensor is left on the mapping and the mapping and its float32 pages go (Synapse-size nnFormer, bf16,
    512 x 512 x 200 CT: peak 1.85 -> 1.29 GB). Returns ``model``."""
    inference_weights(model, amp)
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.dtype != amp:
            t.data = t.data.clone()
    return model
