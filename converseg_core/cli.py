"""`converseg`: the command-line front door.

converseg segment --image kitchen.jpg --query "where can I safely put the knife?" --out mask.png
converseg models
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import BACKENDS
from .errors import ConverSegError
from .files import atomic_write_files
from .processing import read_rgb
from .registry import list_models

# Masks must stay exactly 0/255: only lossless formats.
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


def check_outputs(image: Path, out: Path, overlay: Path | None) -> None:
    """Refuse output paths before any work: a lossy or unknown mask format, or overwriting the input."""
    if out.suffix.lower() not in MASK_SUFFIXES:
        raise ConverSegError(
            f"--out {out}: a mask must be written losslessly; use one of {', '.join(MASK_SUFFIXES)}"
        )
    if overlay is not None and overlay.suffix.lower() not in Image.registered_extensions():
        raise ConverSegError(
            f"--overlay {overlay}: unknown image format {overlay.suffix!r}; use .png or .jpg"
        )
    outputs = [p for p in (out, overlay) if p is not None]
    written = [p.resolve() for p in outputs]
    if image.resolve() in written or any(_same_file(image, p) for p in outputs):
        raise ConverSegError(
            f"{image}: the input image would be overwritten by an output (the same path, a link, or a hard "
            "link to it); choose another path"
        )
    if len(set(written)) < len(written) or (overlay is not None and _same_file(out, overlay)):
        raise ConverSegError("--out and --overlay are the same file; choose two paths")
    for flag, path in (("--out", out), ("--overlay", overlay)):
        if path is not None and path.is_dir():
            raise ConverSegError(f"{flag} {path}: is a folder; give a file name such as {path / 'mask.png'}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def encode_image(pixels: np.ndarray, path: Path) -> bytes:
    """The file content of `pixels` in the format `path`'s suffix names (encoded in memory, so nothing is
    written unless every output could be encoded)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=Image.registered_extensions()[path.suffix.lower()])
    return buf.getvalue()


def write_outputs(contents: dict[Path, bytes]) -> None:
    """Write the mask and the overlay all or nothing, atomically (converseg_core.files); an OSError (full
    disk, read-only file system, no permission) becomes the CLI's error and leaves existing files as they were."""
    try:
        for path in contents:
            path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_files(contents)
    except OSError as exc:
        names = " and ".join(str(p) for p in contents)
        raise ConverSegError(f"cannot write {names}: {exc.strerror or exc}; nothing was written") from exc


def segment(
    image: Path,
    queries: list[str],
    out: Path,
    *,
    checkpoint: Path | None = None,
    backend: str = "torch",
    overlay: Path | None = None,
    presence_threshold: float | None = None,
    anchoring: bool = True,
) -> list[dict]:
    """Segment `image` for each query; write the union mask (mono8 0/255) to `out`. Returns one summary
    dict per query."""
    from .segmenter import Segmenter, normalize_query
    from .visualize import overlay_masks
    from .weights import default_checkpoint

    check_outputs(image, out, overlay)
    queries = [normalize_query(q) for q in queries]  # a bad query fails before the model loads
    if presence_threshold is not None and not 0.0 <= presence_threshold <= 1.0:
        raise ConverSegError(f"--presence-threshold is a probability in [0, 1], got {presence_threshold}")
    if checkpoint is None and backend != "torch":
        raise ConverSegError(
            f"--backend {backend} runs an exported folder: pass --checkpoint DIR (export/export_onnx.py"
            f"{', export/build_trt.py' if backend == 'tensorrt' else ''}); the bundled model is a PyTorch file"
        )
    rgb = read_rgb(image)
    source = checkpoint if checkpoint is not None else default_checkpoint()
    seg = Segmenter.from_checkpoint(
        source, backend=backend, presence_threshold=presence_threshold, anchoring=anchoring
    )
    seg.set_image(rgb)
    results = seg.predict(queries)
    union = np.zeros(rgb.shape[:2], dtype=bool)
    for r in results:
        union |= r.mask
    contents = {out: encode_image(union.astype(np.uint8) * 255, out)}
    if overlay is not None:
        contents[overlay] = encode_image(overlay_masks(rgb, [r.mask for r in results]), overlay)
    write_outputs(contents)
    return [
        {
            "query": r.query,
            "present": r.present,
            "presence": round(r.presence, 4),
            "score": round(r.score, 4),
            "area": r.area,
            "box": r.box,
            "peak": r.peak,
            "anchor": r.anchor,
        }
        for r in results
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="converseg", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("segment", help="answer one or more requests about one image with a mask")
    p.add_argument("--image", type=Path, required=True, help="input image (any format Pillow reads)")
    p.add_argument(
        "--query",
        action="append",
        required=True,
        help='the request, e.g. "hand me something to drink from"; '
        "repeat the flag for several (the output mask is their union)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help=f"output mask (mono8, 255 = answer), lossless: {', '.join(MASK_SUFFIXES)}",
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint file (torch) or exported folder (onnxruntime/tensorrt); default: the bundled model",
    )
    p.add_argument("--backend", choices=BACKENDS, default="torch", help="runtime that executes the model")
    p.add_argument("--overlay", type=Path, default=None, help="also write the image with the masks tinted")
    p.add_argument(
        "--presence-threshold",
        type=float,
        default=None,
        help="probability in [0, 1] under which a target counts as absent (empty mask); default: the model's "
        "calibrated one",
    )
    p.add_argument(
        "--no-anchoring",
        action="store_true",
        help="decode every request with its own words, ignoring the model's phrasing memory (by default a "
        "new wording of a concept request is decoded as the nearest phrasing the model trained on; the "
        "output's 'anchor' names it)",
    )
    sub.add_parser("models", help="list the registered model variants")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "models":
        print("\n".join(list_models()))
        return 0
    try:
        summary = segment(
            args.image,
            args.query,
            args.out,
            checkpoint=args.checkpoint,
            backend=args.backend,
            overlay=args.overlay,
            presence_threshold=args.presence_threshold,
            anchoring=not args.no_anchoring,
        )
    except ConverSegError as exc:
        print(f"converseg: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
