"""Torch datasets over `Record`s: tensors pre-processed exactly as the runtime does (converseg_core.processing:
resize longest side, normalize, pad bottom-right) plus the targets, their collate functions, and the
resumable sampler.

`ConverSegDataset` serves training and validation; `ImageFolderDataset` serves unlabeled images to encoder
distillation; `StepSampler` hands both an endless, resumable, DDP-sharded stream of keys.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from converseg_core.config import ConverSegConfig
from converseg_core.processing import preprocess, resized_shape

from .augment import AugmentConfig, augment, swap_left_right
from .records import DatasetError, Record, SampleError
from .sample_io import image_hw, load_mask, load_rgb, resize_mask_padded

log = logging.getLogger(__name__)


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
