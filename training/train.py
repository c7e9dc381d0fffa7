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

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from converseg_core.build import build_model
from converseg_core.checkpoint import load_official_weights
from converseg_core.config import ConverSegConfig
from converseg_core.errors import ConverSegError
from converseg_core.files import atomic_write_text
from converseg_core.tokenizer import QueryTokenizer

from .augment import AugmentConfig
from .cli import config_parser, parse_overrides
from .datasets import ConverSegDataset, StepSampler, collate
from .distributed import Dist, setup_distributed
from .loop import TrainLoop
from .losses import DenseGroundingHead
from .parts import configure_trainable, load_parts, text_start_layer, trainable_parts
from .records import DatasetError, Record, read_records
from .run_state import resume_state
from .splits import split_records
from .text_cache import TextFeatureCache, all_prompt_variants
from .train_config import TrainConfig, check_train_config
from .trunk_cache import TrunkCache

log = logging.getLogger("training.train")


def train(cfg: TrainConfig) -> dict:
    """Run training; returns the final validation metrics (rank 0) and the output paths."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    check_train_config(cfg)
    d, device = setup_distributed(cfg.device, cfg.threads)
    out_dir = prepare_run_folder(cfg, d)
    train_recs, val_recs = training_records(cfg, d)
    model, dense_head, optimizer = build_trained_model(cfg, d, device)
    step = resume(cfg, out_dir / "last.pt", model, optimizer, dense_head, d)
    text_cache = build_text_cache(model, [train_recs, val_recs], cfg, d, [not cfg.no_augment, False])
    trunk_cache = open_trunk_cache(cfg, model.config, train_recs)
    batches = training_batches(cfg, train_recs, model.config, trunk_cache is not None, d, device, step)
    val_ds = ConverSegDataset(val_recs, model.config, full_res=True, on_bad=cfg.on_bad) if val_recs else None
    loop = TrainLoop(
        cfg,
        model=model,
        dense_head=dense_head,
        optimizer=optimizer,
        text_cache=text_cache,
        trunk_cache=trunk_cache,
        val_ds=val_ds,
        d=d,
        device=device,
        out_dir=out_dir,
        step=step,
    )
    return loop.run(batches)


def prepare_run_folder(cfg: TrainConfig, d: Dist) -> Path:
    """Create the run folder and record the run's options in train_config.json."""
    out_dir = Path(cfg.out_dir)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    d.barrier()
    return out_dir


def training_records(cfg: TrainConfig, d: Dist) -> tuple[list[Record], list[Record]]:
    """(training, validation) records: --val-data when given, else a scene-level split of --data; held-out
    templates never train."""
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
    return train_recs, val_recs


def build_trained_model(
    cfg: TrainConfig, d: Dist, device: torch.device
) -> tuple[nn.Module, DenseGroundingHead | None, torch.optim.Optimizer]:
    """The model (seeded, --init and --init-official loaded, on `device`, untrained parts frozen), the dense
    grounding head when --dense-weight > 0, and the AdamW optimizer over what trains."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, pretrained_text=not cfg.random_text_encoder, **parse_overrides(cfg.override))
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
        param_groups.append(
            {"params": list(dense_head.parameters()), "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": 0.0}
        )
    return model, dense_head, torch.optim.AdamW(param_groups, betas=(0.9, 0.999))


def resume(
    cfg: TrainConfig,
    last: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dense_head: DenseGroundingHead | None,
    d: Dist,
) -> int:
    """The step to start from: last.pt's with --resume (weights and optimizer restored), else 0."""
    step = 0
    if cfg.resume and last.is_file():
        step = resume_state(last, model, optimizer, dense_head)
        if d.main:
            log.info("resumed from %s at step %d", last, step)
    if step >= cfg.steps and d.main:
        log.info("already at step %d of %d", step, cfg.steps)
    return step


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


def open_trunk_cache(cfg: TrainConfig, config: ConverSegConfig, train_recs: list[Record]) -> TrunkCache | None:
    """The --trunk-cache features, checked to hold every training image; None without the flag."""
    if not cfg.trunk_cache:
        return None
    trunk_cache = TrunkCache.open(cfg.trunk_cache, config)
    uncached = sorted({str(r.image) for r in train_recs if r.image not in trunk_cache})
    if uncached:
        raise SystemExit(f"--trunk-cache {cfg.trunk_cache} lacks {len(uncached)} training images, e.g. {uncached[0]}")
    return trunk_cache


def training_batches(
    cfg: TrainConfig,
    train_recs: list[Record],
    config: ConverSegConfig,
    cached_features: bool,
    d: Dist,
    device: torch.device,
    step: int,
):
    """An endless iterator of collated training micro-batches, this process's shard, starting where `step`
    left off (so a resumed run sees the data an uninterrupted one would)."""
    train_ds = ConverSegDataset(
        train_recs,
        config,
        augment_cfg=None if cfg.no_augment else AugmentConfig(),
        on_bad=cfg.on_bad,
        seed=cfg.seed,
        queries_per_image=cfg.queries_per_image,
        cached_features=cached_features,
    )
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
    return iter(loader)


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
