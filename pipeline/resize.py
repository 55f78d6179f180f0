"""PIL's bilinear resize, bit for bit, on any device (docs: internals/data-path.md).

torchvision's ``Resize`` runs PIL's fixed-point bilinear arithmetic on the host, one image at
a time; ``pil_resize`` does the same arithmetic on a batch of uint8 images where they live
(a GPU), so the device data path feeds the network exactly the notebook's pixels.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

# PIL's bilinear resize (Pillow src/libImaging/Resample.c), which torchvision's Resize
# runs on PIL images: per axis, weights in double, rounded to integers scaled by 2^22
# (PRECISION_BITS = 32 - 8 - 2); each output is (2^21 + sum(pixel * k)) >> 22, clipped to
# 0..255; horizontal pass first, its result stored as uint8, then vertical.
_PRECISION_BITS = 22
SCRATCH_BYTES = 256 << 20  # float64 working memory per chunk of images


@functools.lru_cache(maxsize=64)
def _pil_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """Resample.c's integer weights as a dense (out_size, in_size) int64 matrix."""
    # precompute_coeffs() with the bilinear filter (support 1), the same double operations
    # in the same order, then normalize_coeffs_8bpc(). int() truncates like C's (int).
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 1.0 * filterscale
    ss = 1.0 / filterscale
    k = np.zeros((out_size, in_size), dtype=np.int64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        w = [max(0.0, 1.0 - abs((x + xmin - center + 0.5) * ss)) for x in range(xmax)]
        ww = 0.0
        for v in w:  # summed in order: the normalisation must round like C's
            ww += v
        if ww != 0.0:
            w = [v / ww for v in w]
        k[xx, xmin:xmin + xmax] = [int((0.5 if v >= 0 else -0.5) + v * (1 << _PRECISION_BITS))
                                   for v in w]
    return k


@functools.lru_cache(maxsize=64)
def _pil_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """(in_size, out_size) float64 on ``device``: k / 2^22. Cached, so a per-batch resize
    copies nothing from the host (no sync)."""
    k = torch.from_numpy(_pil_coefficients(in_size, out_size)).to(torch.float64)
    return k.mul_(2.0 ** -_PRECISION_BITS).t().contiguous().to(device)


def _pil_pass(x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    # float64 is exact: the weights (k / 2^22, k >= 0) sum to ~1, so every partial sum is a
    # multiple of 2^-22 below 2^9, 31 significant bits of float64's 53, in any summation
    # order (a GPU's GEMM too). + 0.5 then floor is Resample.c's (2^21 + sum) >> 22.
    return (x @ weights).add_(0.5).floor_().clamp_(0, 255)


def pil_resize(images: torch.Tensor, size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size), bit for bit PIL's
    ``Image.resize((size, size), BILINEAR)`` of each image, on the images' device.

    Chunked so that the float64 scratch stays near 256 MB; ``out`` (uint8, on the same
    device) receives the result when given.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"pil_resize takes uint8 (N, C, H, W) images, not {images.dtype} "
                         f"{tuple(images.shape)}")
    n, c, h, w = images.shape
    if out is None:
        out = torch.empty((n, c, size, size), dtype=torch.uint8, device=images.device)
    elif out.shape != (n, c, size, size) or out.device != images.device or out.dtype != torch.uint8:
        raise ValueError(f"pil_resize: out must be uint8 {(n, c, size, size)} on {images.device}")
    if (h, w) == (size, size):  # Image.resize returns a copy
        return out.copy_(images)
    scratch = 8 * c * (h * w + 2 * h * size + size * size)  # input, pass 1 (+ copy), pass 2
    chunk = max(1, SCRATCH_BYTES // scratch)
    # ImagingResampleInner skips the pass of an axis whose size does not change.
    wx = _pil_weights(w, size, images.device) if w != size else None
    wy = _pil_weights(h, size, images.device) if h != size else None
    for start in range(0, n, chunk):
        x = images[start:start + chunk].to(torch.float64)
        if wx is not None:
            x = _pil_pass(x, wx)
        if wy is not None:
            x = _pil_pass(x.transpose(-1, -2), wy).transpose(-1, -2)
        out[start:start + chunk].copy_(x)  # integral 0..255: the cast is exact
    return out
