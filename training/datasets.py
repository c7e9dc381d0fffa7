"""Dataset readers for training and evaluation.

Formats read (see docs/TRAINING.md for examples):
- data engine output (docs/ARCHITECTURE.md): a folder with index.json and shard-*/samples.jsonl;
- ConverSeg JSONL: one JSON object a line with `image`, `mask_merged`, `prompt` (paths relative to the file);
- items.json: a JSON list (or {"items": [...]}) of the same objects;
- COCO instance annotations plus a prompt list: the COCO file's `prompts` key (or a separate JSON list) of
  {"image_id", "prompt", "annotation_ids"}; an empty `annotation_ids` list is a no-target (negative) query.

Every reader returns `Record`s; `ConverSegDataset` turns them into tensors pre-processed exactly as the runtime
does (converseg_core.processing: resize longest side, normalize, pad bottom-right) plus the targets.
"""

from __future__ import annotations

import json
import logging
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from converseg_core.checkpoint import safe_torch_load
from converseg_core.config import ConverSegConfig
from converseg_core.errors import InputError
from converseg_core.files import atomic_write
from converseg_core.processing import preprocess, read_rgb, read_size, resized_shape

from .augment import AugmentConfig, augment, swap_left_right

log = logging.getLogger(__name__)
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


# ---------------------------------------------------------------------------------------------- readers


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


# ---------------------------------------------------------------------------------------------- splits


def _bucket(key: str) -> float:
    return (zlib.crc32(key.encode()) & 0xFFFFFFFF) / 2**32


def split_key(r: Record) -> str:
    """What decides a sample's side: its scene id, else its image's folder and file name. Not the whole
    path: that depends on how --data was typed (`data/x.jsonl`, `./data/x.jsonl`, an absolute path), and
    training and calibration typed differently would then split differently, calibrating on trained images."""
    return r.scene_id or f"{r.image.parent.name}/{r.image.name}"


def _side(r: Record, val_fraction: float, held: set[str]) -> str:
    """'val' (a validation scene), 'train', or 'unused': a held-out-template sample of a training scene."""
    if _bucket(split_key(r)) < val_fraction:
        return "val"
    heldout = r.template_split == "heldout" or (r.template_id is not None and r.template_id in held)
    return "unused" if heldout else "train"


def split_records(
    records: Sequence[Record], *, val_fraction: float, heldout_templates: Sequence[str] = ()
) -> tuple[list[Record], list[Record]]:
    """Split by scene (a scene never lands on both sides), deterministically (crc32 of the scene id).

    Samples whose template is held out never train; they are kept for validation only when their scene is
    a validation scene, so held-out templates are measured on held-out scenes as well.
    """
    held = set(map(str, heldout_templates))
    sides = [_side(r, val_fraction, held) for r in records]
    train = [r for r, side in zip(records, sides, strict=True) if side == "train"]
    val = [r for r, side in zip(records, sides, strict=True) if side == "val"]
    return train, val


def unused_records(
    records: Sequence[Record], *, val_fraction: float, heldout_templates: Sequence[str] = ()
) -> list[Record]:
    """The samples `split_records` puts on neither side: held-out-template requests of training scenes.

    A training run never sees their phrasings, only their scenes, so they measure phrasing generalization
    without the test set, on many more requests than the validation scenes hold."""
    held = set(map(str, heldout_templates))
    return [r for r in records if _side(r, val_fraction, held) == "unused"]


# ---------------------------------------------------------------------------------------------- loading


def load_rgb(path: Path) -> np.ndarray:
    """The image as the runtime reads it (converseg_core.processing.read_rgb: upright, deep grey scaled), or
    SampleError, which the datasets count and skip."""
    try:
        return read_rgb(path)
    except InputError as exc:
        raise SampleError(str(exc)) from exc


def image_hw(path: Path) -> tuple[int, int]:
    """(height, width) of an image as load_rgb reads it (EXIF orientation applied), from its header only."""
    try:
        return read_size(path)
    except InputError as exc:
        raise SampleError(str(exc)) from exc


def load_mask(record: Record, h: int, w: int) -> np.ndarray:
    """Target mask as H x W bool, checked against the image size."""
    if record.mask is None:
        return np.zeros((h, w), dtype=bool)
    if callable(record.mask):
        mask = record.mask(h, w)
    else:
        try:
            with Image.open(record.mask) as im:
                arr = np.asarray(im.convert("L") if im.mode not in ("L", "1", "P") else im)
        except (OSError, SyntaxError, ValueError) as exc:
            raise SampleError(f"{record.mask}: cannot read mask ({exc})") from exc
        if arr.ndim != 2:
            raise SampleError(f"{record.mask}: mask must be single-channel, got shape {arr.shape}")
        mask = arr != 0  # docs/TRAINING.md: non-zero is target, whatever the maximum
    if mask.shape != (h, w):
        raise SampleError(
            f"{record.mask}: mask size {mask.shape[::-1]} differs from image {record.image} size {(w, h)}"
        )
    if record.negative and mask.any():
        raise SampleError(f"{record.mask}: sample is marked negative but its mask is not empty")
    if not record.negative and not mask.any():
        raise SampleError(f"{record.mask}: positive sample with an empty mask")
    return mask


def resize_mask_padded(mask: np.ndarray, img_size: int) -> np.ndarray:
    """Mask -> img_size x img_size float32 in 0..1 with the image's resize + bottom-right pad geometry."""
    h, w = mask.shape
    nh, nw = resized_shape(h, w, img_size)
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.BILINEAR)
    out = np.zeros((img_size, img_size), dtype=np.float32)
    out[:nh, :nw] = np.asarray(m, dtype=np.float32) / 255.0
    return out


class ConverSegDataset(torch.utils.data.Dataset):
    """Records -> tensors for training/validation.

    With queries_per_image=0 an item is one record; with K > 0 an item is one image with up to K of its
    requests (drawn at random per epoch), so the image encoder runs once for K queries. An item is keyed by an
    index or (index, draw) so augmentation is reproducible and resumable. It is a dict:
      image: 3 x S x S float32, normalized and padded as at runtime; valid_hw: (h, w) of the image inside S x S;
      mask_low: k x 1 x L x L float32 soft targets (L = 4 * S / 16, area-averaged from the padded mask);
      mask_full: k x 1 x S x S float32 in {0, 1} (when full_res); presence: k floats (0 for negatives);
      prompt: k requests (left/right swapped if flipped); index: k record indices; num_bad: dropped requests;
      input_ids, attention_mask: k x T int64 (QueryTokenizer, when a tokenizer is given; collate pads T).
    With cached_features (training.trunk_cache) the image is not decoded: `feature_key` (image path, mirrored)
    replaces `image`, and augmentation is a horizontal mirror only (landscape images, whose padding is below).
    A bad image raises SampleError, or (on_bad="skip") gives None; a bad mask drops its request (num_bad).
    `collate` counts both.
    """

    def __init__(
        self,
        records: Sequence[Record],
        config: ConverSegConfig,
        *,
        augment_cfg: AugmentConfig | None = None,
        full_res: bool = False,
        on_bad: str = "skip",
        seed: int = 0,
        queries_per_image: int = 0,
        tokenizer: Any = None,
        max_tokens: int | None = None,
        cached_features: bool = False,
    ) -> None:
        if not records:
            raise DatasetError("the dataset is empty (no samples)")
        if on_bad not in ("skip", "error"):
            raise ValueError("on_bad must be 'skip' or 'error'")
        self.records = list(records)
        self.img_size = config.img_size
        self.low_res = config.low_res_size
        self.pixel_mean = config.pixel_mean
        self.pixel_std = config.pixel_std
        self.augment_cfg = augment_cfg
        self.full_res = full_res
        self.on_bad = on_bad
        self.seed = seed
        self.queries_per_image = queries_per_image
        self.cached_features = cached_features
        # Token ids are only needed where the text encoder runs on the batch (not with the feature cache).
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens or config.max_query_tokens
        if queries_per_image > 0:
            groups: dict[Path, list[int]] = {}
            for i, r in enumerate(self.records):
                groups.setdefault(r.image, []).append(i)
            self.groups = list(groups.values())
        else:
            self.groups = [[i] for i in range(len(self.records))]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        index, draw = key if isinstance(key, tuple) else (key, 0)
        members = self.groups[index]
        rng = np.random.default_rng([self.seed, index, draw])
        if 0 < self.queries_per_image < len(members):
            members = sorted(rng.choice(members, self.queries_per_image, replace=False).tolist())
        try:
            return self._load(members, rng)
        except SampleError as exc:
            if self.on_bad == "error":
                raise
            log.warning("skipping image %s: %s", self.records[members[0]].image, exc)
            return None

    def _load(self, members: list[int], rng: np.random.Generator) -> dict | None:
        path = self.records[members[0]].image
        image = None if self.cached_features else load_rgb(path)
        h, w = image.shape[:2] if image is not None else image_hw(path)
        kept, masks, bad = [], [], 0
        for i in members:
            try:
                masks.append(load_mask(self.records[i], h, w))
                kept.append(i)
            except SampleError as exc:
                if self.on_bad == "error":
                    raise
                log.warning("skipping sample %d: %s", i, exc)
                bad += 1
        if not kept:
            raise SampleError(
                f"{self.records[members[0]].image}: no readable target among its {bad} request(s)"
            )
        prompts = [self.records[i].prompt for i in kept]
        if image is None:
            aug = self.augment_cfg
            mirrored = aug is not None and w >= h and aug.flip_prob > 0 and rng.random() < aug.flip_prob
            if mirrored:
                masks = [np.ascontiguousarray(m[:, ::-1]) for m in masks]
                prompts = [swap_left_right(p) for p in prompts]
            pixels: dict[str, Any] = {"feature_key": (str(path), bool(mirrored))}
        else:
            if self.augment_cfg is not None:
                image, masks, prompts = augment(rng, image, masks, prompts, self.augment_cfg)
                h, w = image.shape[:2]
            x = preprocess(
                image, img_size=self.img_size, pixel_mean=self.pixel_mean, pixel_std=self.pixel_std
            ).tensor
            pixels = {"image": torch.from_numpy(np.ascontiguousarray(x[0]))}
        full = np.stack([resize_mask_padded(m, self.img_size) for m in masks])
        f = self.img_size // self.low_res
        low = full.reshape(len(kept), self.low_res, f, self.low_res, f).mean(axis=(2, 4))
        item = {
            **pixels,
            "valid_hw": resized_shape(h, w, self.img_size),
            "mask_low": torch.from_numpy(low)[:, None],
            "presence": torch.tensor([0.0 if self.records[i].negative else 1.0 for i in kept]),
            "prompt": prompts,
            "index": kept,
            "num_bad": bad,
        }
        if self.full_res:
            item["mask_full"] = torch.from_numpy((full >= 0.5).astype(np.float32))[:, None]
        if self.tokenizer is not None:
            tok = self.tokenizer.encode(prompts, self.max_tokens)
            item["input_ids"] = torch.from_numpy(tok.input_ids)
            item["attention_mask"] = torch.from_numpy(tok.attention_mask)
        return item


PER_QUERY_KEYS = ("mask_low", "mask_full", "presence", "prompt", "index")


def _pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate k_i x T_i token tensors along queries, right-padding T with 0 (the [PAD] id / no attention)."""
    t = max(x.shape[1] for x in tensors)
    return torch.cat([F.pad(x, (0, t - x.shape[1])) for x in tensors])


def collate(items: list[dict | None]) -> dict:
    """Batch items: images stacked (B), per-query fields concatenated (Q) with image_index (Q) pointing at
    their image. Skipped items (None) and dropped requests are counted in num_skipped; `empty` when nothing is
    left."""
    kept = [it for it in items if it is not None]
    skipped = len(items) - len(kept) + sum(it["num_bad"] for it in kept)
    if not kept:
        return {"num_skipped": skipped, "empty": True}
    out: dict[str, Any] = {"num_skipped": skipped, "empty": False}
    if "image" in kept[0]:
        out["image"] = torch.stack([it["image"] for it in kept])
    else:
        out["feature_key"] = [it["feature_key"] for it in kept]
    out["valid_hw"] = [it["valid_hw"] for it in kept]
    out["image_index"] = torch.tensor([b for b, it in enumerate(kept) for _ in it["index"]])
    for key in PER_QUERY_KEYS:
        if key in kept[0]:
            vals = [it[key] for it in kept]
            out[key] = (
                torch.cat(vals) if isinstance(vals[0], torch.Tensor) else [v for vs in vals for v in vs]
            )
    if "input_ids" in kept[0]:
        out["input_ids"] = _pad_cat([it["input_ids"] for it in kept])
        out["attention_mask"] = _pad_cat([it["attention_mask"] for it in kept])
    return out


# ---------------------------------------------------------------------------------------------- text cache


class TextFeatureCache:
    """Frozen MiniLM token features, computed once per unique prompt (the text side dominates nothing at
    train time then: a lookup and a pad). Stored as float16 trimmed to each prompt's real tokens."""

    def __init__(self, features: dict[str, torch.Tensor] | None = None, *, max_tokens: int = 32) -> None:
        self.features: dict[str, torch.Tensor] = dict(features or {})
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return len(self.features)

    @torch.no_grad()
    def add(
        self,
        prompts: Sequence[str],
        text_encoder: torch.nn.Module,
        tokenizer,
        *,
        batch_size: int = 64,
        stop_layer: int | None = None,
    ) -> int:
        """Encode the prompts not cached yet; returns how many were new. `stop_layer`: cache the features
        after that many MiniLM layers (the input of the layers a run trains) instead of the last ones."""
        new = sorted({p for p in prompts if p not in self.features})
        if not new:
            return 0
        device = next(text_encoder.parameters()).device
        for i in range(0, len(new), batch_size):
            chunk = new[i : i + batch_size]
            tok = tokenizer.encode(chunk, self.max_tokens)
            ids = torch.from_numpy(tok.input_ids).to(device)
            am = torch.from_numpy(tok.attention_mask).to(device)
            if stop_layer is None:
                feats = text_encoder(ids, am).float().cpu()
            else:
                feats = text_encoder.hidden_states(ids, am, stop=stop_layer).float().cpu()
            for j, p in enumerate(chunk):
                n = int(tok.attention_mask[j].sum())
                self.features[p] = feats[j, :n].to(torch.float16).clone()
        return len(new)

    def lookup(
        self, prompts: Sequence[str], device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (Q x T x D float32 features, Q x T int64 attention mask), right-padded to the longest."""
        try:
            feats = [self.features[p] for p in prompts]
        except KeyError as exc:
            raise KeyError(f"prompt {exc} not in the text feature cache; call add() first") from exc
        t = max(f.shape[0] for f in feats)
        out = torch.zeros(len(feats), t, feats[0].shape[1])
        am = torch.zeros(len(feats), t, dtype=torch.int64)
        for i, f in enumerate(feats):
            out[i, : f.shape[0]] = f.float()
            am[i, : f.shape[0]] = 1
        return out.to(device), am.to(device)

    def save(self, path: str | Path) -> None:
        with atomic_write(path) as f:
            torch.save({"max_tokens": self.max_tokens, "features": self.features}, f)

    @classmethod
    def load(cls, path: str | Path) -> TextFeatureCache:
        data = safe_torch_load(path, what="text feature cache")
        return cls(data["features"], max_tokens=data["max_tokens"])


def all_prompt_variants(records: Sequence[Record], with_flips: bool) -> list[str]:
    """Every prompt text a dataset can produce (including left/right-swapped ones when flipping)."""
    from .augment import swap_left_right

    out = {r.prompt for r in records}
    if with_flips:
        out |= {swap_left_right(p) for p in out}
    return sorted(out)


# ---------------------------------------------------------------------------------------------- unlabeled


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


class ImageFolderDataset(torch.utils.data.Dataset):
    """Unlabeled images -> normalized padded tensors (optionally crop/flip/colour augmented).

    `sizes`: one network input size per model (student, teacher); each is pre-processed from the same
    augmented image exactly as the runtime would, under keys image_0, image_1...
    """

    def __init__(
        self,
        images: Sequence[Path],
        config: ConverSegConfig,
        *,
        sizes: Sequence[int] | None = None,
        augment_cfg: AugmentConfig | None,
        seed: int = 0,
    ):
        if not images:
            raise DatasetError("no images")
        self.images = list(images)
        self.config = config
        self.sizes = list(sizes or [config.img_size])
        self.augment_cfg = augment_cfg
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        index, draw = key if isinstance(key, tuple) else (key, 0)
        try:
            image = load_rgb(self.images[index])
        except SampleError as exc:
            log.warning("skipping image %d: %s", index, exc)
            return None
        if self.augment_cfg is not None:
            rng = np.random.default_rng([self.seed, index, draw])
            image, _, _ = augment(rng, image, [], [], self.augment_cfg)
        c = self.config
        item: dict[str, Any] = {"index": index}
        for i, size in enumerate(self.sizes):
            x = preprocess(image, img_size=size, pixel_mean=c.pixel_mean, pixel_std=c.pixel_std).tensor
            item[f"image_{i}"] = torch.from_numpy(np.ascontiguousarray(x[0]))
        return item


def collate_images(items: list[dict | None]) -> dict:
    """Batch ImageFolderDataset items; unreadable images (None) are counted in num_skipped."""
    kept = [it for it in items if it is not None]
    out: dict[str, Any] = {"num_skipped": len(items) - len(kept), "empty": not kept}
    if kept:
        for key in kept[0]:
            vals = [it[key] for it in kept]
            out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


class StepSampler(torch.utils.data.Sampler):
    """Infinite, resumable sampler of (index, draw) keys, sharded across DDP ranks.

    Epoch e is a permutation seeded by (seed, e); rank r takes every world-th element. Starting at
    `start_step` skips start_step * batch_size keys by arithmetic, so a resumed run sees the same data
    (and the same augmentation draws) as an uninterrupted one.
    """

    def __init__(
        self, n: int, *, batch_size: int, seed: int, rank: int = 0, world: int = 1, start_step: int = 0
    ):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.start = start_step * batch_size

    def __iter__(self):
        per_epoch = self.n // self.world
        if per_epoch == 0:
            raise DatasetError(f"{self.n} samples cannot be shared across {self.world} processes")
        pos = self.start
        while True:
            epoch, offset = divmod(pos, per_epoch)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g)[self.rank :: self.world][:per_epoch].tolist()
            for i in perm[offset:]:
                yield (i, epoch)
            pos = (epoch + 1) * per_epoch


# ---------------------------------------------------------------------------------------------- toy data


def write_toy_dataset(
    root: str | Path, *, num_scenes: int = 8, size: tuple[int, int] = (96, 72), seed: int = 0
) -> Path:
    """Write a tiny synthetic dataset in the data engine's output format (tests, smoke runs).

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
