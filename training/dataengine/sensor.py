"""Camera sensor effects applied to a clean render: exposure and white balance, vignetting, defocus or
motion blur, shot and read noise, JPEG compression.

The parameters are drawn per scene from the scene RNG (`sample_sensor_params`), so an image depends only
on (seed, scene index); the noise itself comes from a generator seeded by the parameters. Only the RGB
image changes: masks, depth and the scene graph's geometry stay those of the clean render.

Light-dependent steps (exposure, white balance, vignetting, blur, noise) work on linear intensities, as a
sensor does; the image is then encoded with a 2.2 gamma and, as most robot camera drivers do, JPEG.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass

import numpy as np

GAMMA = 2.2
_TO_LINEAR = ((np.arange(256, dtype=np.float32) / 255.0) ** GAMMA).astype(np.float32)
_LIN_LEVELS = 4096  # linear -> 8-bit goes through a table of this many entries (faster than a power)
_TO_SRGB = np.round(
    255.0 * (np.arange(_LIN_LEVELS, dtype=np.float32) / (_LIN_LEVELS - 1)) ** (1 / GAMMA)
).astype(np.uint8)


@dataclass(frozen=True)
class SensorParams:
    """One scene's sensor effects. Gains are factors on linear intensity; noise sigmas are in linear
    units of full scale (0..1); blur lengths in pixels; jpeg_quality None means no JPEG round trip."""

    seed: int  # seeds the noise draws
    exposure: float  # overall gain, 2 ** EV
    wb_gains: tuple[float, float, float]  # residual white-balance error per channel (mean 1)
    vignette: float  # intensity lost at the image corners (0 = none)
    defocus_sigma: float  # Gaussian blur sigma (0 = sharp)
    motion_px: float  # motion blur length (0 = none)
    motion_angle_deg: float
    shot_noise: float  # photon noise: sigma = sqrt(shot_noise * intensity)
    read_noise: float  # sigma of signal-independent noise
    jpeg_quality: int | None


def sample_sensor_params(rng: np.random.Generator) -> SensorParams:
    """Effects of everyday robot cameras: mostly mild, sometimes a blurred or noisy frame."""
    wb = np.exp(rng.uniform(-0.08, 0.08, 3))
    wb /= np.exp(np.log(wb).mean())
    blur = rng.random()
    return SensorParams(
        seed=int(rng.integers(2**31)),
        exposure=float(2 ** rng.uniform(-0.6, 0.5)),
        wb_gains=tuple(float(g) for g in wb),
        vignette=float(rng.uniform(0.0, 0.35)),
        defocus_sigma=float(rng.uniform(0.5, 1.2)) if blur < 0.2 else 0.0,
        motion_px=float(rng.uniform(2.0, 6.0)) if 0.2 <= blur < 0.3 else 0.0,
        motion_angle_deg=float(rng.uniform(0, 180)),
        shot_noise=float(rng.uniform(0.0002, 0.003)),
        read_noise=float(rng.uniform(0.001, 0.01)),
        jpeg_quality=int(rng.integers(60, 96)) if rng.random() < 0.7 else None,
    )


def apply_sensor(rgb: np.ndarray, params: SensorParams) -> np.ndarray:
    """The image the camera would deliver: H x W x 3 uint8 in, H x W x 3 uint8 out."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"sensor effects need an H x W x 3 uint8 image, got {rgb.shape} {rgb.dtype}")
    h, w, _ = rgb.shape
    x = _TO_LINEAR[rgb]
    gain = params.exposure * np.asarray(params.wb_gains, np.float32)
    if params.vignette > 0:
        yy, xx = np.ogrid[0:h, 0:w]
        r2 = ((xx - (w - 1) / 2) ** 2 + (yy - (h - 1) / 2) ** 2) / ((w / 2) ** 2 + (h / 2) ** 2)
        x *= (1 - params.vignette * r2).astype(np.float32)[..., None] * gain
    else:
        x *= gain
    if params.defocus_sigma > 0:
        from scipy import ndimage

        x = ndimage.gaussian_filter(x, sigma=(params.defocus_sigma, params.defocus_sigma, 0), mode="nearest")
    if params.motion_px > 0:
        x = _motion_blur(x, params.motion_px, params.motion_angle_deg)
    rng = np.random.default_rng(params.seed)
    np.clip(x, 0, 1, out=x)
    sigma = np.sqrt(params.shot_noise * x + params.read_noise**2)
    x += sigma * rng.standard_normal(x.shape, dtype=np.float32)
    np.clip(x, 0, 1, out=x)
    out = _TO_SRGB[(x * (_LIN_LEVELS - 1) + 0.5).astype(np.int32)]
    if params.jpeg_quality is not None:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(out).save(buf, format="JPEG", quality=params.jpeg_quality)
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def _motion_blur(x: np.ndarray, length: float, angle_deg: float) -> np.ndarray:
    """Average of the image shifted along a line of `length` pixels (edges repeat)."""
    n = max(2, int(round(length)))
    dx, dy = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    offs = [(int(round((t - (n - 1) / 2) * dy)), int(round((t - (n - 1) / 2) * dx))) for t in range(n)]
    pad = int(math.ceil(n / 2)) + 1
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    h, w = x.shape[:2]
    acc = np.zeros_like(x)
    for oy, ox in offs:
        acc += xp[pad + oy : pad + oy + h, pad + ox : pad + ox + w]
    return acc / n


def apply_sensor_effects(frame, params: SensorParams):
    """The frame with its RGB through the sensor (render.Frame in, a new Frame out); masks, depth and
    camera untouched; the parameters recorded in frame.sensor."""
    return dataclasses.replace(frame, rgb=apply_sensor(frame.rgb, params), sensor=dataclasses.asdict(params))
