"""Mask refinement by the frame's own features: grow each mask over the places that look like it.

The decoder's masks are right about where a target is more often than about its extent; on photographs they
cover a fraction of a large object. The image embedding already groups places of one object together, so a
mask can be extended over the places whose embedding resembles the mask's:

    mask logits Q x M x h x w -> mean over each embedding place (h / g x w / g pixels) -> sigmoid -> weights
    image tokens B x g*g x C, centred over the places and unit length
        -> foreground prototype (weighted mean under the mask), background prototype (under its complement)
    each place's token . (foreground - background), standardised over the places, upsampled to h x w

The result is added to the mask logits at the config's `mask_refinement` scale (0: off, nothing computed).
No weights: it works on any trained model. The scale is an inference setting chosen on validation scenes
(`training.calibrate --mask-refinement`), stored in the model file and baked into exported decoders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import standardise_places


def prototype_refinement(
    image_tokens: torch.Tensor, mask_logits: torch.Tensor, grid: int, size: int
) -> torch.Tensor:
    """How much each pixel looks like its mask rather than the rest of the frame, as mask-logit offsets.

    image_tokens: B x grid*grid x C (B = 1, shared by the requests, or Q); mask_logits: Q x M x size x size.
    grid and size are the config's embed_size and low_res_size: Python numbers, so an exported graph's pooling
    is fixed. Returns Q x M x size x size, standardised over the places of each mask before upsampling."""
    tokens = F.normalize(image_tokens - image_tokens.mean(dim=1, keepdim=True), dim=-1)  # B x g*g x C
    kernel = size // grid
    inside = torch.sigmoid(F.avg_pool2d(mask_logits, kernel_size=kernel).flatten(2))  # Q x M x g*g
    outside = 1.0 - inside
    inside = inside / inside.sum(dim=-1, keepdim=True).clamp_min(1e-6)
    outside = outside / outside.sum(dim=-1, keepdim=True).clamp_min(1e-6)
    direction = torch.matmul(inside - outside, tokens)  # Q x M x C: foreground minus background prototype
    z = standardise_places(torch.matmul(direction, tokens.transpose(1, 2)))  # Q x M x g*g
    return F.interpolate(
        z.unflatten(-1, (grid, grid)), scale_factor=float(kernel), mode="bilinear", align_corners=False
    )
