"""Dataset records and their readers: every supported format becomes a list of `Record`s.

Formats read (see docs/TRAINING.md for examples):
- data engine output (docs/ARCHITECTURE.md): a folder with index.json and shard-*/samples.jsonl;
- ConverSeg JSONL: one JSON object a line with `image`, `mask_merged`, `prompt` (paths relative to the file);
- items.json: a JSON list (or {"items": [...]}) of the same objects;
- COCO instance annotations plus a prompt list: the COCO file's `prompts` key (or a separate JSON list) of
  {"image_id", "prompt", "annotation_ids"}; an empty `annotation_ids` list is a no-target (negative) query.

`read_records` picks the reader from what a path is; `list_images` lists unlabeled images for distillation.
No torch: evaluation and calibration read datasets without it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DatasetError(ValueError):
    """A dataset that cannot be read as asked (missing index, no samples, malformed line...)."""


class SampleError(DatasetError):
    """One bad sample (corrupt image or mask, size mismatch); skipped with a counted warning or raised."""


@dataclass
class Record:
    """One (image, request, target) sample. `mask` is a mono8 file path, a callable (H, W) -> bool mask
    (COCO polygons), or None for a no-target query."""

    image: Path
    prompt: str
    mask: Path | Callable[[int, int], np.ndarray] | None
    negative: bool = False
    family: str | None = None
    template_id: str | None = None
    template_split: str | None = None  # "seen" | "heldout" when the source says so
    scene_id: str | None = None
    sample_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def seen_split_name(split: str | None) -> str | None:
    """The data engine calls the phrasings training may use "train"; every reader reports them as "seen"."""
    return "seen" if split == "train" else split


def _record_from_json(obj: dict, base: Path, where: str) -> Record:
    try:
        prompt = obj["prompt"]
        image = base / obj["image"]
    except KeyError as exc:
        raise DatasetError(f"{where}: missing field {exc}") from exc
    if not isinstance(prompt, str) or not prompt.strip():
        raise DatasetError(f"{where}: `prompt` must be a non-empty string")
    mask_rel = obj.get("mask_merged", obj.get("mask"))
    negative = bool(obj.get("negative", False))
    if mask_rel is None and not negative:
        raise DatasetError(f"{where}: no `mask_merged` and not marked negative")
    split = seen_split_name(obj.get("template_split"))
    if split is None and "heldout_template" in obj:
        split = "heldout" if obj["heldout_template"] else "seen"
    return Record(
        image=image,
        prompt=prompt,
        mask=base / mask_rel if mask_rel is not None else None,
        negative=negative,
        family=obj.get("family"),
        template_id=None if obj.get("template_id") is None else str(obj["template_id"]),
        template_split=split,
        scene_id=None if obj.get("scene_id") is None else str(obj["scene_id"]),
        sample_id=str(obj["sample_id"])
        if obj.get("sample_id") is not None
        else (str(obj["id"]) if "id" in obj else None),
        extra={k: obj[k] for k in ("answer_kind", "targets", "negative_kind", "rendered_kind") if k in obj},
    )


def read_jsonl(path: str | Path) -> list[Record]:
    """ConverSeg JSONL: `image`, `mask_merged`, `prompt` per line (extra data engine fields are kept)."""
    path = Path(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            records.append(_record_from_json(obj, path.parent, f"{path}:{lineno}"))
    return records


def read_items_json(path: str | Path) -> list[Record]:
    """items.json: a list (or {"items": [...]}) of {image, mask_merged, prompt} objects."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    items = data.get("items") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise DatasetError(f"{path}: expected a JSON list of items or an object with an `items` list")
    return [_record_from_json(obj, path.parent, f"{path}[{i}]") for i, obj in enumerate(items)]


def read_dataengine(root: str | Path, *, require_index: bool = True) -> list[Record]:
    """Data engine output: every complete shard (with its DONE marker) under `root`."""
    root = Path(root)
    index = root / "index.json"
    if not index.is_file():
        if require_index:
            raise DatasetError(
                f"{root}: no index.json; the data engine writes it last, so the run is unfinished "
                "(pass require_index=False / --allow-partial to read the complete shards anyway)"
            )
        warnings.warn(f"{root}: no index.json, reading complete shards only", stacklevel=2)
    records: list[Record] = []
    shards = sorted(p for p in root.glob("shard-*") if p.is_dir() and not p.name.endswith(".tmp"))
    if index.is_file():
        # index.json names the shards of the run that wrote it; a folder may hold more (a bigger run that
        # is still going, or a smaller re-run): read exactly what the index describes.
        try:
            listed = json.loads(index.read_text(encoding="utf-8")).get("shards")
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{index}: not valid JSON ({exc.msg})") from exc
        if listed is not None:
            extra = sorted({s.name for s in shards} - set(listed))
            if extra:
                warnings.warn(
                    f"{root}: ignoring {len(extra)} shard(s) not listed in index.json", stacklevel=2
                )
            missing = [name for name in listed if not (root / name / "DONE").is_file()]
            if missing:
                raise DatasetError(f"{root}: index.json lists shards without a DONE marker: {missing[:5]}")
            shards = [root / name for name in listed]
    incomplete = [s.name for s in shards if not (s / "DONE").is_file()]
    if incomplete:
        warnings.warn(
            f"{root}: skipping {len(incomplete)} incomplete shard(s): {incomplete[:5]}", stacklevel=2
        )
    for shard in shards:
        if (shard / "DONE").is_file():
            records.extend(read_jsonl(shard / "samples.jsonl"))
    return records


def _decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (uncompressed counts list or compressed string) -> H x W bool, column-major as COCO."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, str):
        # pycocotools' LEB128-like string encoding (rleFrString), re-implemented to avoid the dependency.
        values, p, s = [], 0, counts.encode()
        while p < len(s):
            x, k, more = 0, 0, True
            while more:
                c = s[p] - 48
                x |= (c & 0x1F) << (5 * k)
                more = bool(c & 0x20)
                p += 1
                k += 1
                if not more and (c & 0x10):
                    x |= -1 << (5 * k)
            if len(values) > 2:
                x += values[-2]
            values.append(x)
        counts = values
    flat = np.zeros(h * w, dtype=bool)
    pos, val = 0, False
    for n in counts:
        if val:
            flat[pos : pos + n] = True
        pos += n
        val = not val
    return flat.reshape(w, h).T


def _coco_mask_fn(anns: list[dict]) -> Callable[[int, int], np.ndarray]:
    def render(h: int, w: int) -> np.ndarray:
        canvas = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(canvas)
        out = np.zeros((h, w), dtype=bool)
        for ann in anns:
            seg = ann.get("segmentation")
            if isinstance(seg, list):
                for poly in seg:
                    if len(poly) >= 6:
                        draw.polygon([(poly[i], poly[i + 1]) for i in range(0, len(poly), 2)], fill=255)
            elif isinstance(seg, dict):
                m = _decode_rle(seg)
                if m.shape != (h, w):
                    raise SampleError(f"annotation {ann.get('id')}: RLE size {m.shape} != image {(h, w)}")
                out |= m
        return out | (np.asarray(canvas) > 0)

    return render


def read_coco(
    path: str | Path, *, prompts: str | Path | None = None, image_root: str | Path | None = None
) -> list[Record]:
    """COCO instance annotations + prompts. Prompts come from `prompts` (a JSON list) or the file's `prompts`
    key; each is {"image_id", "prompt", "annotation_ids": [...]} (empty list: no target), optionally with
    `family` and `template_id`."""
    path = Path(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    if not {"images", "annotations"} <= set(data):
        raise DatasetError(f"{path}: not a COCO annotation file (needs `images` and `annotations`)")
    plist = json.loads(Path(prompts).read_text(encoding="utf-8")) if prompts else data.get("prompts")
    if not plist:
        raise DatasetError(f"{path}: no prompt list (give a prompts file or a `prompts` key)")
    root = Path(image_root) if image_root else path.parent
    images = {im["id"]: im for im in data["images"]}
    anns = {a["id"]: a for a in data["annotations"]}
    records = []
    for i, p in enumerate(plist):
        where = f"{path} prompts[{i}]"
        if p.get("image_id") not in images:
            raise DatasetError(f"{where}: unknown image_id {p.get('image_id')!r}")
        ids = p.get("annotation_ids", [])
        missing = [a for a in ids if a not in anns]
        if missing:
            raise DatasetError(f"{where}: unknown annotation ids {missing}")
        chosen = [anns[a] for a in ids]
        im = images[p["image_id"]]
        records.append(
            Record(
                image=root / im["file_name"],
                prompt=p["prompt"],
                mask=_coco_mask_fn(chosen) if chosen else None,
                negative=not chosen,
                family=p.get("family"),
                template_id=None if p.get("template_id") is None else str(p["template_id"]),
                template_split=seen_split_name(p.get("template_split")),
                scene_id=str(p["image_id"]),
                sample_id=str(p.get("id", i)),
            )
        )
    return records


def read_records(path: str | Path, **kwargs: Any) -> list[Record]:
    """Read any supported format, chosen from what `path` is. Raises DatasetError on an empty dataset."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.is_dir():
        if (path / "index.json").is_file() or any(path.glob("shard-*")):
            records = read_dataengine(path, require_index=not kwargs.get("allow_partial", False))
        elif (path / "items.json").is_file():
            records = read_items_json(path / "items.json")
        elif (path / "samples.jsonl").is_file():
            records = read_jsonl(path / "samples.jsonl")
        else:
            raise DatasetError(f"{path}: a folder without index.json, shard-*, items.json or samples.jsonl")
    elif path.suffix == ".jsonl":
        records = read_jsonl(path)
    elif path.suffix == ".json":
        head = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(head, dict) and "annotations" in head:
            records = read_coco(path, prompts=kwargs.get("prompts"), image_root=kwargs.get("image_root"))
        else:
            records = read_items_json(path)
    else:
        raise DatasetError(f"{path}: unknown dataset format (expected a folder, .jsonl or .json)")
    if not records:
        raise DatasetError(f"{path}: the dataset is empty (no samples)")
    return records


def list_images(path: str | Path) -> list[Path]:
    """Images for distillation: a folder (searched recursively) or data engine output (its scene images)."""
    path = Path(path)
    if path.is_dir() and ((path / "index.json").is_file() or any(path.glob("shard-*"))):
        images = sorted({r.image for r in read_dataengine(path, require_index=False)})
    elif path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        raise DatasetError(f"{path}: not a folder of images or data engine output")
    if not images:
        raise DatasetError(f"{path}: no images found")
    return images
