"""`python -m training.dataengine.gallery --data DIR --out sheet.jpg`: a contact sheet of samples.

Each tile: the image with the merged mask overlaid (tinted, outlined), the family, answer kind, and the
prompt. Samples are picked round-robin over families so every family shows up.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FAMILY_COLOURS = {
    "entities": (230, 60, 60),
    "spatial": (60, 160, 230),
    "intent": (240, 170, 40),
    "affordances": (60, 200, 90),
    "functions": (170, 90, 220),
    "safety": (240, 80, 160),
    "physical": (40, 200, 200),
}


def load_samples(data: Path) -> list[dict]:
    """All samples of a data-engine output folder, paths made absolute."""
    data = Path(data)
    out = []
    for jl in sorted(data.glob("shard-*/samples.jsonl")):
        for line in jl.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            rec["_dir"] = str(jl.parent)
            out.append(rec)
    return out


def pick(samples: list[dict], n: int, seed: int, *, one_per_scene: bool = False) -> list[dict]:
    """n samples, round-robin over family kinds; with one_per_scene, no two from one scene (so a sheet
    shows n scenes: their rooms, lights, cameras and sensor effects)."""
    rng = random.Random(seed)
    by_fam: dict[str, list[dict]] = {}
    for s in samples:
        key = (
            s["family"]
            + ("/neg" if s["negative"] else "")
            + ("/region" if s["answer_kind"] == "region" else "")
        )
        by_fam.setdefault(key, []).append(s)
    for v in by_fam.values():
        rng.shuffle(v)
    keys = sorted(by_fam)
    chosen: list[dict] = []
    scenes: set[str] = set()
    while len(chosen) < n and any(by_fam.values()):
        for k in keys:
            while by_fam[k] and len(chosen) < n:
                s = by_fam[k].pop()
                if one_per_scene and s["scene_id"] in scenes:
                    continue
                chosen.append(s)
                scenes.add(s["scene_id"])
                break
    return chosen


def tile(rec: dict, size: tuple[int, int], font) -> Image.Image:
    w, h = size
    base = Path(rec["_dir"])
    img = Image.open(base / rec["image"]).convert("RGB")
    mask = np.asarray(Image.open(base / rec["mask_merged"])) > 0
    arr = np.asarray(img).astype(np.float32)
    col = np.array(FAMILY_COLOURS.get(rec["family"], (255, 0, 0)), dtype=np.float32)
    arr[mask] = 0.45 * arr[mask] + 0.55 * col
    over = Image.fromarray(arr.astype(np.uint8))
    edge = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.NEAREST)
    over = over.resize((w, h), Image.Resampling.BILINEAR)
    e = np.asarray(edge) > 0
    border = e & ~(np.roll(e, 1, 0) & np.roll(e, -1, 0) & np.roll(e, 1, 1) & np.roll(e, -1, 1))
    o = np.asarray(over).copy()
    o[border] = (255, 255, 255)
    text_h = 58
    t = Image.new("RGB", (w, h + text_h), (24, 24, 24))
    t.paste(Image.fromarray(o), (0, 0))
    d = ImageDraw.Draw(t)
    tag = (
        rec["family"]
        + (" | NEGATIVE" if rec["negative"] else "")
        + (" | region" if rec["answer_kind"] == "region" else "")
    )
    d.text((4, h + 2), tag, fill=tuple(int(c) for c in col), font=font)
    for k, line in enumerate(textwrap.wrap(rec["prompt"], width=int(w / 6.2))[:3]):
        d.text((4, h + 15 + 13 * k), line, fill=(235, 235, 235), font=font)
    return t


def make_sheet(
    data: Path,
    *,
    n: int = 16,
    cols: int = 4,
    tile_size=(256, 192),
    seed: int = 0,
    one_per_scene: bool = False,
) -> Image.Image:
    samples = load_samples(data)
    if not samples:
        raise FileNotFoundError(f"no shard-*/samples.jsonl under {data}")
    chosen = pick(samples, n, seed, one_per_scene=one_per_scene)
    try:
        font = ImageFont.load_default(size=11)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    tiles = [tile(r, tile_size, font) for r in chosen]
    tw, th = tiles[0].size
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tw + (cols + 1) * 4, rows * th + (rows + 1) * 4), (0, 0, 0))
    for k, t in enumerate(tiles):
        sheet.paste(t, (4 + (k % cols) * (tw + 4), 4 + (k // cols) * (th + 4)))
    return sheet


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.dataengine.gallery", description=__doc__.splitlines()[0]
    )
    p.add_argument("--data", type=Path, required=True, help="output folder of python -m training.dataengine")
    p.add_argument("--out", type=Path, required=True, help="sheet to write (.jpg or .png)")
    p.add_argument("--n", type=int, default=16, help="number of samples on the sheet")
    p.add_argument("--cols", type=int, default=4, help="tiles per row")
    p.add_argument("--tile-width", type=int, default=256, help="tile width in pixels (height keeps 4:3)")
    p.add_argument("--seed", type=int, default=0, help="which samples are picked")
    p.add_argument("--quality", type=int, default=80, help="JPEG quality")
    p.add_argument(
        "--one-per-scene",
        action="store_true",
        help="at most one sample per scene, so the sheet shows the range of rooms, lights and cameras",
    )
    args = p.parse_args(argv)
    try:
        sheet = make_sheet(
            args.data,
            n=args.n,
            cols=args.cols,
            tile_size=(args.tile_width, args.tile_width * 3 // 4),
            seed=args.seed,
            one_per_scene=args.one_per_scene,
        )
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.suffix.lower() in (".jpg", ".jpeg"):
        sheet.save(args.out, quality=args.quality, optimize=True)
    else:
        sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB, {args.n} samples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
