"""Features of a frozen pretrained image trunk, computed once per training image and read back by training.

A model whose image trunk does not train (converseg_edge_lite: EfficientNet-Lite with its ImageNet weights)
spends most of a training step's time on that trunk, recomputing the same features for the same picture
every epoch. This module runs the trunk once per image, with ONNX Runtime (about four times faster than
PyTorch eager on this CPU), and stores the stride 4, 8, 16 and 32 maps as float16 arrays that training
memory-maps. Augmentation is limited to what commutes with the cache: a horizontal flip reads the stored
features mirrored (the trunk was trained with mirrored ImageNet images, so mirrored features are what a
mirrored picture gives, up to the kernels' small asymmetries), with left and right swapped in the request.

    python -m training.trunk_cache build --data runs/v2/data/train --model converseg_edge_lite --out runs/v2/cache
    python -m training.trunk_cache distill --cache runs/v2/cache --teacher converseg_core/assets/converseg_edge.pt \
        --out runs/v2/distilled.pt

`distill` fits the new encoder's neck to a teacher checkpoint's image embeddings on the cached features
(Huber loss, NanoSAM's recipe) and writes a checkpoint of the new variant whose other parts (fusion,
decoder, presence, trained MiniLM layers) are the teacher's: a starting point for `training.train`
with `--trunk-cache`, where the decoder already understands the embedding it is given.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from converseg_core.build import build_model
from converseg_core.checkpoint import load_checkpoint, save_checkpoint
from converseg_core.config import ConverSegConfig
from converseg_core.errors import CheckpointError
from converseg_core.files import atomic_write, atomic_write_text
from converseg_core.modeling.efficientnet_lite import LiteImageEncoder
from converseg_core.processing import preprocess
from converseg_core.registry import get_config, list_models

from .records import read_records
from .sample_io import load_rgb

log = logging.getLogger("trunk_cache")

FORMAT = "converseg-trunk-cache"
VERSION = 1
LEVELS = ("s4", "s8", "s16", "s32")


def cache_key(config: ConverSegConfig) -> dict:
    """What the cached features depend on: a cache made for another trunk or input is refused."""
    return {
        "image_encoder": config.image_encoder,
        "variant": config.image_encoder_args.get("variant"),
        "img_size": config.img_size,
        "pixel_mean": list(config.pixel_mean),
        "pixel_std": list(config.pixel_std),
    }


def lite_encoder(model: torch.nn.Module) -> LiteImageEncoder:
    encoder = model.image_encoder
    if not isinstance(encoder, LiteImageEncoder) or not encoder.freeze_trunk:
        raise SystemExit(
            f"{model.config.name}: a trunk cache needs an image encoder with a frozen pretrained trunk "
            "(image_encoder=efficientnet_lite, freeze_trunk=True)"
        )
    return encoder


class _TrunkGraph(torch.nn.Module):
    def __init__(self, encoder: LiteImageEncoder) -> None:
        super().__init__()
        self.trunk = encoder.trunk

    def forward(self, image: torch.Tensor):
        return tuple(self.trunk.features(image))


def trunk_session(encoder: LiteImageEncoder, folder: Path, threads: int):
    """An ONNX Runtime session of the trunk's features (exported from a copy: the exporter may alter the
    module it traces)."""
    import onnxruntime as ort

    path = folder / "trunk.onnx"
    example = torch.zeros(1, 3, encoder.img_size, encoder.img_size)
    graph = _TrunkGraph(copy.deepcopy(encoder)).eval()
    with torch.no_grad():
        torch.onnx.export(
            graph, (example,), str(path), input_names=["image"], output_names=list(LEVELS),
            opset_version=17, dynamo=False, dynamic_axes={"image": {0: "batch"}},
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def build_cache(
    config: ConverSegConfig, images: list[Path], out: Path, *, threads: int = 2, batch_size: int = 4
) -> Path:
    """Run the frozen trunk once per image (the runtime's pre-processing, no augmentation); write
    out/{s4,s8,s16,s32}.npy (N x C x H x W float16) and out/meta.json. Resumes a partial cache."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    model = build_model(config, pretrained_text=False)
    encoder = lite_encoder(model).eval()
    meta_path = out / "meta.json"
    names = [str(p) for p in images]
    done = 0
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != cache_key(config) or meta.get("images") != names:
            raise SystemExit(f"{out}: holds a cache of other images or another trunk; choose another --out")
        done = int(meta.get("done", 0))
    with torch.no_grad():
        shapes = [tuple(f.shape[1:]) for f in encoder.trunk.features(torch.zeros(1, 3, config.img_size, config.img_size))]
    mode = "r+" if done else "w+"
    arrays = [
        np.lib.format.open_memmap(out / f"{lvl}.npy", mode=mode, dtype=np.float16, shape=(len(images), *shape))
        for lvl, shape in zip(LEVELS, shapes, strict=True)
    ]
    session = trunk_session(encoder, out, threads)

    def write_meta(count: int) -> None:
        meta = {"format": FORMAT, "version": VERSION, "key": cache_key(config), "images": names, "done": count}
        atomic_write_text(meta_path, json.dumps(meta))

    with tqdm(total=len(images), initial=done, desc="trunk features", unit="img") as progress:
        for start in range(done, len(images), batch_size):
            paths = images[start : start + batch_size]
            x = np.concatenate(
                [
                    preprocess(
                        load_rgb(p), img_size=config.img_size, pixel_mean=config.pixel_mean,
                        pixel_std=config.pixel_std,
                    ).tensor
                    for p in paths
                ]
            )
            for array, feats in zip(arrays, session.run(None, {"image": x}), strict=True):
                array[start : start + len(paths)] = feats.astype(np.float16)
            for array in arrays:
                array.flush()
            write_meta(start + len(paths))
            progress.update(len(paths))
    return out


@dataclass
class TrunkCache:
    """A built cache, memory-mapped. lookup() gives the trunk features of images by path, mirrored where
    asked. A path is found as it was cached or as the file it leads to, so a set that links to the cached
    pictures (training.dataengine.mix, training.dataengine.reprompt) reads the same features."""

    folder: Path
    index: dict[str, int]
    arrays: list[np.ndarray]
    by_file: dict[str, int] | None = None  # real path -> row, made on the first miss

    def row(self, image: Path | str) -> int | None:
        """The cache row of an image path, or None."""
        found = self.index.get(str(image))
        if found is not None:
            return found
        if self.by_file is None:
            self.by_file = {os.path.realpath(p): i for p, i in self.index.items()}
        return self.by_file.get(os.path.realpath(image))

    @classmethod
    def open(cls, folder: str | Path, config: ConverSegConfig) -> TrunkCache:
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise SystemExit(f"{folder}: no trunk cache here (build it with python -m training.trunk_cache build)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise SystemExit(f"{folder}: not a trunk cache of this version ({meta.get('format')} {meta.get('version')})")
        if meta["key"] != cache_key(config):
            raise SystemExit(f"{folder}: made for {meta['key']}, the model needs {cache_key(config)}")
        if meta["done"] != len(meta["images"]):
            raise SystemExit(f"{folder}: incomplete ({meta['done']} of {len(meta['images'])}); run build again")
        arrays = [np.load(folder / f"{lvl}.npy", mmap_mode="r") for lvl in LEVELS]
        return cls(folder, {p: i for i, p in enumerate(meta["images"])}, arrays)

    def __contains__(self, image: Path | str) -> bool:
        return self.row(image) is not None

    def lookup(
        self, images: list[str], flips: list[bool], device: torch.device, levels: tuple[str, ...] = LEVELS
    ) -> list[torch.Tensor]:
        """B image paths and mirror flags -> the `levels` (default: s4, s8, s16, s32) as B x C x H x W float32
        tensors."""
        rows = [self.row(p) for p in images]
        out = []
        for level in levels:
            array = self.arrays[LEVELS.index(level)]
            batch = np.stack([array[r][..., ::-1] if f else array[r] for r, f in zip(rows, flips, strict=True)])
            out.append(torch.from_numpy(batch.astype(np.float32)).to(device))
        return out


def distill_neck(
    cache: TrunkCache,
    teacher_path: Path,
    config: ConverSegConfig,
    out: Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    val_images: int = 64,
    seed: int = 0,
) -> dict:
    """Fit the new encoder's neck to the teacher's image embeddings; write a checkpoint of `config` whose
    other parts are the teacher's. Returns the train and held-out fit (R^2 of the embedding); `val_images`
    images (at most a fifth of the cache) are held out for the latter."""
    from tqdm import tqdm

    teacher_ckpt = load_checkpoint(teacher_path)
    teacher = build_model(checkpoint=teacher_path).eval()
    if teacher.config.img_size != config.img_size:
        raise SystemExit(f"teacher img_size {teacher.config.img_size} != student {config.img_size}")
    overrides = {
        k: getattr(teacher.config, k)
        for k in ("text_trainable_layers", "mask_presence", "fusion_sentence_token", "presence_threshold",
                  "presence_score_weight")
    }
    student = build_model(config.replace(**overrides))
    state = {k: v for k, v in teacher_ckpt.state_dict.items() if not k.startswith("image_encoder.")}
    missing = student.load_state_dict(state, strict=False)
    wrong = [k for k in missing.missing_keys if not k.startswith(("image_encoder.", "text_encoder."))]
    if wrong or missing.unexpected_keys:
        raise SystemExit(f"teacher parts do not fit: missing {wrong[:5]} unexpected {missing.unexpected_keys[:5]}")
    encoder = lite_encoder(student)
    images = sorted(cache.index, key=cache.index.get)
    if len(images) < 2:
        raise SystemExit(f"{cache.folder}: {len(images)} cached image(s); the neck needs at least 2 (one held out)")
    # At most a fifth of the images is held out to measure the fit, and at least one.
    held_out = max(1, min(val_images, len(images) // 5))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    val, train = [images[i] for i in order[:held_out]], [images[i] for i in order[held_out:]]

    # Teacher embeddings: once per image and teacher file, from the pictures (the teacher has its own encoder).
    digest = hashlib.sha256(Path(teacher_path).read_bytes()).hexdigest()[:16]
    target_file = cache.folder / f"teacher-{digest}.npy"
    if target_file.is_file():
        targets = np.load(target_file, mmap_mode="r")
    else:
        e = config.embed_size
        targets = np.zeros((len(images), config.prompt_embed_dim, e, e), np.float16)
        with torch.inference_mode():
            for i, p in enumerate(tqdm(images, desc="teacher embeddings", unit="img")):
                x = preprocess(
                    load_rgb(Path(p)), img_size=config.img_size, pixel_mean=teacher.config.pixel_mean,
                    pixel_std=teacher.config.pixel_std,
                ).tensor
                targets[i] = teacher.encode_image(torch.from_numpy(x)).embedding[0].numpy()
        with atomic_write(target_file) as f:
            np.save(f, targets)

    def batch_of(paths: list[str], flips: list[bool]) -> tuple[torch.Tensor, torch.Tensor]:
        """The neck's prediction (it reads strides 16 and 32 only) and the teacher's embedding."""
        f16, f32 = cache.lookup(paths, flips, torch.device("cpu"), levels=("s16", "s32"))
        rows = [cache.index[p] for p in paths]
        want = np.stack([targets[r][..., ::-1] if f else targets[r] for r, f in zip(rows, flips, strict=True)])
        return encoder.embed(f16, f32), torch.from_numpy(want.astype(np.float32))

    def r2(paths: list[str]) -> float:
        encoder.eval()
        err = tot = 0.0
        with torch.no_grad():
            for i in range(0, len(paths), batch_size):
                chunk = paths[i : i + batch_size]
                got, want = batch_of(chunk, [False] * len(chunk))
                err += float(((got - want) ** 2).sum())
                tot += float(((want - want.mean(dim=(0, 2, 3), keepdim=True)) ** 2).sum())
        encoder.train()
        return 1.0 - err / max(tot, 1e-9)

    params = [p for n, p in encoder.named_parameters() if p.requires_grad and not n.startswith("hires")]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    encoder.train()
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc="distill neck", unit="step"):
        for g in optimizer.param_groups:
            g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        pick = rng.integers(0, len(train), batch_size)
        got, want = batch_of([train[i] for i in pick], list(rng.random(batch_size) < 0.5))
        loss = F.huber_loss(got, want, delta=1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    fit = {"train_r2": round(r2(train[:256]), 4), "val_r2": round(r2(val), 4), "steps": steps,
           "seconds": round(time.perf_counter() - t0, 1)}
    # The teacher's presence threshold came along in the config: a starting point, to be calibrated again.
    save_checkpoint(student, out, meta={"distilled_from": str(teacher_path), "neck_fit": fit})
    return fit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="run the frozen trunk once per training image and store its features")
    b.add_argument("--data", required=True, help="dataset whose images to cache (any reader of training.records)")
    b.add_argument("--model", default="converseg_edge_lite", choices=list_models(), help="variant (its trunk)")
    b.add_argument("--img-size", type=int, default=0, help="network input side (0: the variant's)")
    b.add_argument("--out", required=True, help="cache folder (resumes a partial one)")
    b.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    b.add_argument("--batch-size", type=int, default=4, help="images per trunk run")
    d = sub.add_parser("distill", help="fit the neck to a teacher's embeddings on the cached features")
    d.add_argument("--cache", required=True, help="folder written by build")
    d.add_argument("--teacher", required=True, help="ConverSeg checkpoint whose embeddings and heads to take")
    d.add_argument("--model", default="converseg_edge_lite", choices=list_models(), help="variant to write")
    d.add_argument("--img-size", type=int, default=0, help="network input side (0: the variant's)")
    d.add_argument("--out", required=True, help="checkpoint to write")
    d.add_argument("--steps", type=int, default=2000, help="optimizer steps")
    d.add_argument("--batch-size", type=int, default=16, help="images per step")
    d.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine decay)")
    d.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = get_config(args.model)
    if args.img_size:
        config = config.replace(img_size=args.img_size)
    try:
        if args.command == "build":
            records = read_records(args.data)
            images = sorted({r.image for r in records})
            build_cache(config, images, Path(args.out), threads=args.threads, batch_size=args.batch_size)
            print(f"cached the trunk features of {len(images)} images in {args.out}")
        else:
            torch.set_num_threads(args.threads)
            cache = TrunkCache.open(args.cache, config)
            fit = distill_neck(cache, Path(args.teacher), config, Path(args.out), steps=args.steps,
                               batch_size=args.batch_size, lr=args.lr)
            print(json.dumps(fit))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
