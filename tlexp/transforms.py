"""Augmentation and evaluation presets on batched uint8 tensors (one set of random parameters per image).

Augmentation runs on whole batches on the training device (``TrainPreset``);
evaluation is deterministic (``EvalPreset``). Normalisation lives in the model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class EvalPreset:
    """Deterministic: uint8 (B, 3, S, S) -> float in [0, 1]. Normalisation lives in the model."""

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return batch.float().div_(255.0)


class TrainPreset:
    """The seed's augmentation -- random horizontal flip, rotation within +/-15 degrees, colour jitter
    (brightness 0.2, contrast 0.2, saturation 0.2, hue 0.1) -- on a whole batch at once.

    torchvision's v2 transforms draw one set of random parameters per call, so
    calling them on a batch would flip/rotate/jitter every image the same way.
    Here every image gets its own parameters, drawn from ``generator``, and the
    ops are the v2 functional kernels' maths vectorised over the batch (the
    tests check each against ``torchvision.transforms.v2.functional``).
    """

    def __init__(self, *, flip_p: float = 0.5, degrees: float = 15.0, brightness: float = 0.2,
                 contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.1) -> None:
        self.flip_p, self.degrees = flip_p, degrees
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def sample_params(self, n: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        u = torch.rand(n, 6, generator=generator)
        return {
            "flip": u[:, 0] < self.flip_p,
            "angle": (u[:, 1] * 2 - 1) * self.degrees,
            "brightness": 1 + (u[:, 2] * 2 - 1) * self.brightness,
            "contrast": 1 + (u[:, 3] * 2 - 1) * self.contrast,
            "saturation": 1 + (u[:, 4] * 2 - 1) * self.saturation,
            "hue": (u[:, 5] * 2 - 1) * self.hue,
        }

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        params = self.sample_params(batch.shape[0], generator)
        return self.apply(batch, params)

    def apply(self, batch: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float (B, 3, H, W) in [0, 1], contiguous; ``params`` from ``sample_params``.

        Written for memory traffic (the CPU spends as long here as in a small model's step otherwise):
        flip and rotation are one gather on the uint8 pixels, the colour ops work in place.
        """
        # non_blocking: a plain host-to-GPU copy would wait for the GPU to finish its queue every batch.
        p = {k: v.to(batch.device, non_blocking=True) for k, v in params.items()}
        x = flip_rotate(batch, p["flip"], p["angle"])
        col = lambda v: v.view(-1, 1, 1, 1).to(torch.float32)  # noqa: E731  per-image factor, (B, 1, 1, 1)
        # Brightness: blend with black = scale, fused with uint8 -> [0, 1] floats.
        x = (x * col(p["brightness"] / 255.0)).clamp_(0, 1)
        # Contrast: blend with the mean grey level of the image (mean of grey = grey of the channel means).
        means = x.mean(dim=(-2, -1))  # (B, 3)
        grey_mean = (0.2989 * means[:, 0] + 0.587 * means[:, 1] + 0.114 * means[:, 2]).view(-1, 1, 1, 1)
        c = col(p["contrast"])
        x.mul_(c).add_((1 - c) * grey_mean).clamp_(0, 1)
        # Saturation: blend with the image's own grey version.
        s = col(p["saturation"])
        grey = _grayscale(x).mul_(1 - s)  # before x changes in place
        x.mul_(s).add_(grey).clamp_(0, 1)
        return adjust_hue_(x, p["hue"])


def flip_rotate(batch: torch.Tensor, flip: torch.Tensor, angle_deg: torch.Tensor) -> torch.Tensor:
    """Flip (where ``flip``) then rotate each image about its centre, as v2.functional.horizontal_flip then
    rotate (counter-clockwise degrees, nearest, fill 0): one gather of source pixels, any dtype and layout.
    Returns a contiguous (B, C, H, W) tensor of ``batch``'s dtype.
    """
    b, c, h, w = batch.shape
    theta = torch.deg2rad(angle_deg.to(device=batch.device, dtype=torch.float32))
    cos, sin = torch.cos(theta), torch.sin(theta)
    zero = torch.zeros_like(cos)
    # affine_grid works in normalised coordinates; the aspect-ratio terms keep non-square images undistorted.
    mat = torch.stack([torch.stack([cos, -sin * h / w, zero], -1), torch.stack([sin * w / h, cos, zero], -1)], 1)
    grid = F.affine_grid(mat, [b, 1, h, w], align_corners=False)  # (B, H, W, 2): source x, y in [-1, 1]
    # grid_sample's nearest lookup (align_corners=False): unnormalise, round half to even.
    ix = torch.round(((grid[..., 0] + 1) * w - 1) / 2)
    iy = torch.round(((grid[..., 1] + 1) * h - 1) / 2)
    inside = (ix >= 0) & (ix <= w - 1) & (iy >= 0) & (iy <= h - 1)
    ix = torch.where(flip.view(-1, 1, 1), (w - 1) - ix, ix)  # sampling the flipped image = mirrored column
    src = torch.where(inside, iy.long() * w + ix.long(), 0).view(b, 1, h * w)
    out = torch.gather(batch.flatten(2), 2, src.expand(b, c, h * w))  # (B, C, H*W)
    out.mul_(inside.view(b, 1, h * w).to(out.dtype))  # fill 0 outside the source image
    return out.view(b, c, h, w)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (0.2989 * r).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def adjust_hue_(x: torch.Tensor, hue_factor: torch.Tensor) -> torch.Tensor:
    """Shift hue per image by ``hue_factor`` in [-0.5, 0.5], in place (torchvision's RGB->HSV->RGB round trip)."""
    r, g, b = x.unbind(-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)
    cr = maxc - minc  # chroma; also v * s, the HSV -> RGB amplitude
    grey = cr == 0
    # Hue in sixths of a turn, as torchvision's hr/hg/hb selection: red is max, else green is max, else blue.
    h6 = torch.where(maxc == r, g - b, torch.where(maxc == g, (b - r).add_(cr, alpha=2), (r - g).add_(cr, alpha=4)))
    h6 = torch.where(grey, 0.0, h6.div_(torch.where(grey, 1.0, cr)))
    h6 = h6.div_(6.0).add_(hue_factor.view(-1, 1, 1).to(h6.dtype)).remainder_(1.0).mul_(6.0)
    # HSV -> RGB in closed form, channel c = v - v*s*clamp(min(k, 4-k), 0, 1) with k = (n_c + 6h) mod 6:
    # the same values as torchvision's six-way select, at a fraction of the memory traffic.
    for channel, n in ((r, 5.0), (g, 3.0), (b, 1.0)):
        k = (h6 + n).remainder_(6.0)
        torch.sub(maxc, torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(cr), out=channel)
    return x
