"""NIfTI preprocessing for glam3d: ``glam3d-preprocess`` (see :mod:`preprocessing.cli`) and the per-scan API
(:func:`preprocessing.pipeline.preprocess_scan`, :func:`preprocessing.pipeline.restore_labels`)."""
