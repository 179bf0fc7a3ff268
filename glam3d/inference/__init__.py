"""Inference: trained networks applied to new scans.

* :mod:`~glam3d.inference.predictor`: :class:`~glam3d.inference.predictor.Predictor`, a checkpoint ready to
  segment scans from Python (``predict``) or to files (``predict_files``, what ``glam3d predict`` runs);
* :mod:`~glam3d.inference.sliding_window`: :func:`~glam3d.inference.sliding_window.predict_volume`, the
  slab-streaming sliding window whose memory does not grow with the scan's length;
* :mod:`~glam3d.inference.precision`: the autocast policy and the weights cast once for it;
* :mod:`~glam3d.inference.cases`: which scans an input path holds (image files in any SimpleITK format, nnU-Net
  channel files grouped into cases, DICOM series), reading them, and where their outputs go;
* :mod:`~glam3d.inference.outputs`: a label map written in the input's format and geometry;
* :mod:`~glam3d.inference.components`: the largest-component postprocessing a slab of planes at a time;
* :mod:`~glam3d.inference.manifest`: the ``predictions.json`` record of a prediction folder (provenance per case)
  and the folder's ownership.

The disk-backed arrays the sliding window reads and writes are in :mod:`glam3d.utils.ooc`.

Importing this package imports no torch; ``from glam3d.inference import Predictor`` (or ``predict_volume``)
imports its module when asked.
"""
from __future__ import annotations

import importlib

__all__ = ["Predictor", "predict_volume"]

_LAZY = {"Predictor": "predictor", "predict_volume": "sliding_window"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
