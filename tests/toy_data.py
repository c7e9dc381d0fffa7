"""A tiny synthetic dataset in the data engine's output format, for tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def write_toy_dataset(
    root: str | Path, *, num_scenes: int = 8, size: tuple[int, int] = (96, 72), seed: int = 0
) -> Path:
    """Write a tiny synthetic dataset in the data engine's output format (tests).

    Each scene holds two coloured shapes on grey; requests ask for a colour+shape (family "attribute"),
    the shape on the left/right ("spatial"), or a colour+shape that is absent (negative). Template "t2" is
    marked held out.
    """
    root = Path(root)
    shard = root / "shard-00000"
    for sub in ("images", "masks", "scenes"):
        (shard / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 70, 220)}
    shapes = ("square", "circle")
    w, h = size
    lines = []
    counts: dict[str, int] = {}
    for s in range(num_scenes):
        scene = f"scene{s:05d}"
        img = Image.new("RGB", (w, h), (128, 128, 128))
        draw = ImageDraw.Draw(img)
        objs = []
        names = list(colors)
        picked = rng.choice(len(names), 2, replace=False)
        for k, half in enumerate((0, 1)):
            color, shape = names[picked[k]], shapes[int(rng.integers(2))]
            r = int(rng.integers(h // 6, h // 4))
            cx = int(rng.integers(half * w // 2 + r, (half + 1) * w // 2 - r))
            cy = int(rng.integers(r, h - r))
            m = Image.new("L", (w, h), 0)
            box = (cx - r, cy - r, cx + r, cy + r)
            for d, fill in ((draw, colors[color]), (ImageDraw.Draw(m), 255)):
                (d.rectangle if shape == "square" else d.ellipse)(box, fill=fill)
            objs.append((color, shape, np.asarray(m) > 0))
        img.save(shard / "images" / f"{scene}.png")
        (shard / "scenes" / f"{scene}.json").write_text(json.dumps({"objects": [o[:2] for o in objs]}))
        absent = next(c for c in names if c not in (objs[0][0], objs[1][0]))
        queries = [
            (f"the {objs[0][0]} {objs[0][1]}", objs[0][2], "attribute", "t0"),
            (f"the {objs[1][0]} {objs[1][1]}", objs[1][2], "attribute", "t0"),
            ("the object on the left", objs[0][2], "spatial", "t1"),
            ("the object on the right", objs[1][2], "spatial", "t2"),
            (f"the {absent} {shapes[s % 2]}", None, "attribute", "t0"),
        ]
        for q, (prompt, mask, family, template) in enumerate(queries):
            sample = f"{scene}_{q}"
            m = np.zeros((h, w), bool) if mask is None else mask
            Image.fromarray(m.astype(np.uint8) * 255).save(shard / "masks" / f"{sample}.png")
            lines.append(
                json.dumps(
                    {
                        "image": f"images/{scene}.png",
                        "mask_merged": f"masks/{sample}.png",
                        "prompt": prompt,
                        "family": family,
                        "template_id": template,
                        "template_split": "heldout" if template == "t2" else "seen",
                        "targets": [] if mask is None else [q],
                        "negative": mask is None,
                        **({"negative_kind": "absent"} if mask is None else {}),
                        "answer_kind": "object",
                        "scene_id": scene,
                        "sample_id": sample,
                    }
                )
            )
            counts[family] = counts.get(family, 0) + 1
    (shard / "samples.jsonl").write_text("\n".join(lines) + "\n")
    (shard / "DONE").write_text("")
    (root / "index.json").write_text(
        json.dumps({"seed": seed, "scenes": num_scenes, "shards": ["shard-00000"], "families": counts})
    )
    return root
