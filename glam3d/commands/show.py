"""``glam3d show``: figures — segmentation overlays, GLAM global-attention maps (paper eq. 7)."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import UserError

EPILOG = """\
examples:
  glam3d show overlay --image img0001.nii.gz --pred preds/img0001.nii.gz --gt label0001.nii.gz --out case1.png
  glam3d show attention --checkpoint best.pt --image img0001.nii.gz --voxel 40 250 200 --out attn.png
  glam3d show attention --checkpoint best.pt --image img0001.nii.gz --voxel 40 250 200 --term patch --out p.png
"""


def add_parser(subparsers):
    p = subparsers.add_parser("show", help="figures: segmentation overlays, global attention maps",
                              description=__doc__.splitlines()[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="figure", metavar="FIGURE", required=True)
    o = sub.add_parser("overlay", help="prediction (and truth) over axial CT slices",
                       description="Axial slices through organ centroids (radiological view), prediction filled "
                                   "with the truth's contours, truth filled beside it.")
    o.add_argument("--image", required=True, metavar="IMG", help="the scan (NIfTI)")
    o.add_argument("--pred", required=True, metavar="PRED", help="predicted label map on the scan's grid")
    o.add_argument("--gt", metavar="GT", help="ground-truth label map on the scan's grid")
    o.add_argument("--out", required=True, metavar="PNG", help="the figure to write")
    o.add_argument("--slices", type=int, nargs="+", default=[4], metavar="N",
                   help="one number: how many slices (auto, through organ centroids); several: axial indices "
                        "of the RAS+ volume")
    a = sub.add_parser("attention", help="GLAM effective global attention of one voxel (paper eq. 7)",
                       description="Runs the checkpoint's network on a window around the voxel and draws the "
                                   "global-attention map of that voxel (through the global tokens) over the scan.")
    a.add_argument("--checkpoint", required=True, metavar="CKPT", help="a trained GLAM checkpoint")
    a.add_argument("--image", required=True, metavar="IMG", help="the scan (NIfTI)")
    a.add_argument("--voxel", required=True, type=int, nargs=3, metavar=("Z", "Y", "X"),
                   help="query voxel, indices of the scan as stored, in (z, y, x) = (k, j, i) order "
                        "(SimpleITK / nnU-Net array order)")
    a.add_argument("--stage", type=int, default=0,
                   help="GLAM layer, in the network's order (encoder stages first; 0 = highest resolution)")
    a.add_argument("--block", type=int, default=-1,
                   help="the map through the G-MSA between block B and block B+1 of the layer (default: the last "
                        "such pair)")
    a.add_argument("--term", choices=("patch", "window", "sum"), default="sum",
                   help="eq. 7's patch-level term (through the window tokens), its window-level term (through the "
                        "previous global tokens, one value per window) or their sum (the paper's G_k; default)")
    a.add_argument("--weighting", choices=("query", "uniform"), default="query",
                   help="weight the window's global tokens by the query's attention to them (in the block that "
                        "reads them), or uniformly")
    a.add_argument("--out", required=True, metavar="PNG", help="the figure to write")
    a.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    return p


def run(args) -> int:
    if args.figure == "overlay":
        return _overlay(args)
    return _attention(args)


def _load(path, what):
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} not found", p)
    try:
        img = nib.load(str(p))
        img.shape  # noqa: B018 - header check
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read {what} ({first[:200]})", p) from None
    if not (len(img.shape) == 3 or (len(img.shape) == 4 and img.shape[3] == 1)):
        raise UserError(f"{what} is not a 3D volume (shape {img.shape})", p)
    return img


def _overlay(args) -> int:
    from ..viz import render_overlay

    image = _load(args.image, "image")
    pred = _load(args.pred, "prediction")
    gt = _load(args.gt, "truth") if args.gt else None
    for other, path, what in ((pred, args.pred, "prediction"), (gt, args.gt, "truth")):
        if other is None:
            continue
        if other.shape[:3] != image.shape[:3] or not np.allclose(other.affine, image.affine, atol=1e-3):
            raise UserError(f"{what} {other.shape[:3]} is not on the image's grid {image.shape[:3]} "
                            f"(shape or affine differ)", path)
    slices = args.slices[0] if len(args.slices) == 1 else args.slices
    ks = render_overlay(image, pred, gt, args.out, slices=slices)
    print(f"wrote {args.out} (axial slices {', '.join(map(str, ks))})")
    return 0


def _attention(args) -> int:
    import torch

    from ..engine.checkpoint import checkpoint_metadata, load_checkpoint, model_from_checkpoint
    from ..viz import render_attention
    from ..inference.cases import preprocessing_pipeline as _pipeline
    from ..inference.predictor import inference_settings, resolve_device as _resolve_device

    try:
        from ..models import attention_map as am
        from ..models.glam import GLAMLayer
    except ImportError as err:
        raise UserError(f"global attention maps need glam3d.models.attention_map, which is not available "
                        f"({err})") from None
    image = _load(args.image, "image")
    state = load_checkpoint(args.checkpoint, mmap=True)
    plan = state.get("plan")
    if not plan:
        raise UserError("the checkpoint carries no preprocessing plan", args.checkpoint)
    device = _resolve_device(args.device, -1)
    model = model_from_checkpoint(state, args.checkpoint).to(device).eval()
    state = checkpoint_metadata(state)
    layers = [m for m in model.modules() if isinstance(m, GLAMLayer) and m.hops()]
    if not layers:
        raise UserError("this network has no GLAM layer with a G-MSA between two blocks: no global attention map",
                        args.checkpoint)
    if not 0 <= args.stage < len(layers):
        raise UserError(f"--stage {args.stage}: the network has {len(layers)} GLAM stages (0..{len(layers) - 1})")
    layer = layers[args.stage]

    arr, meta = _pipeline().preprocess_scan(image, plan)
    q = _voxel_to_preprocessed(args.voxel, image, meta, plan)
    ns = argparse.Namespace(roi_size=None, overlap=None, sw_batch_size=None, mode=None, mirror=None,
                            checkpoint=args.checkpoint)
    roi = inference_settings(state, model, ns)["roi_size"]
    vol = torch.as_tensor(arr)
    # a window of the training size around the query (zero-padded where the scan is smaller)
    lo = [min(max(0, qi - r // 2), max(0, n - r)) for qi, r, n in zip(q, roi, vol.shape[1:])]
    win = torch.zeros((vol.shape[0], *roi))
    src = tuple(slice(l, min(l + r, n)) for l, r, n in zip(lo, roi, vol.shape[1:]))
    win[(slice(None),) + tuple(slice(0, s.stop - s.start) for s in src)] = vol[(slice(None),) + src]
    q_local = [qi - l for qi, l in zip(q, lo)]
    n_hops = len(layer.hops())  # G-MSA between block B and B+1 (the map needs both)
    if not -n_hops <= args.block < n_hops:
        raise UserError(f"--block {args.block}: stage {args.stage}'s G-MSA paths start at blocks 0..{n_hops - 1}")
    block = args.block % n_hops
    try:
        with torch.no_grad(), am.recording(layer, block):
            model(win[None].to(device))
        fshape = layer.blocks[block].last_geometry["spatial_shape"]
        q_feat = [min(int(v * f // r), f - 1) for v, f, r in zip(q_local, fshape, roi)]
        m = am.map_from_recorded(layer, q_feat, block=block, weighting=args.weighting, term=args.term,
                                 normalize=True)
    except ValueError as err:
        raise UserError(f"attention map: {err}") from None
    up = am.upsample_map(m.cpu(), roi).numpy()
    ext = [s.stop - s.start for s in src]
    up = up[tuple(slice(0, e) for e in ext)]
    img_win = win[0].numpy()[tuple(slice(0, e) for e in ext)]
    terms = "patch + window terms" if args.term == "sum" else f"{args.term} term"
    title = (f"GLAM global attention (eq. 7, {terms}), "
             f"stage {args.stage}, blocks {block}-{block + 1}, query voxel "
             f"{tuple(args.voxel)} of {Path(args.image).name}; feature map {tuple(fshape)}")
    codes = tuple(plan.get("orientation", "RAS"))[::-1]  # axis codes of (D, H, W)
    render_attention(img_win, up, q_local, args.out, spacing=plan["target_spacing"], title=title, axcodes=codes)
    print(f"wrote {args.out} (stage {args.stage}: feature map {tuple(fshape)}, query at {tuple(q_feat)})")
    return 0


def _voxel_to_preprocessed(voxel_zyx, image, meta, plan):
    """Scan voxel ``(k, j, i)`` (as stored) → index ``(d, h, w)`` of the preprocessed array."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    shape = tuple(image.shape[:3])
    ijk = tuple(int(v) for v in voxel_zyx[::-1])
    if any(not 0 <= v < n for v, n in zip(ijk, shape)):
        raise UserError(f"--voxel {tuple(voxel_zyx)} is outside the scan (z, y, x) < "
                        f"{tuple(shape[::-1])}", getattr(image, 'get_filename', lambda: None)())
    marker = np.zeros(shape, dtype=np.uint8)
    marker[ijk] = 1
    tr = ornt_transform(io_orientation(np.asarray(image.affine, float)), axcodes2ornt(tuple(plan["orientation"])))
    pos = np.argwhere(apply_orientation(marker, tr))[0]  # in the plan's orientation (x, y, z)
    dhw = pos[::-1]
    (d0, d1), (h0, h1), (w0, w1) = meta["bbox"]
    local = np.asarray(dhw) - np.asarray([d0, h0, w0])
    if np.any(local < 0) or np.any(local >= np.asarray(meta["cropped_shape"])):
        raise UserError(f"--voxel {tuple(voxel_zyx)} lies outside the body crop the network sees")
    scale = np.asarray(meta["resampled_shape"], float) / np.asarray(meta["cropped_shape"], float)
    out = np.floor((local + 0.5) * scale).astype(int)
    return [int(min(max(v, 0), n - 1)) for v, n in zip(out, meta["resampled_shape"])]
