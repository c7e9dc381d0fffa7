"""The training loop of `training.train`: optimizer steps over micro-batches, logging, validation and saving.

`TrainLoop` is built from the parts `training.train.train` prepares (model, optimizer, caches, datasets) and
owns what changes during the run: the step, the counters of bad samples and non-finite steps, the
TensorBoard writer and the progress bar. Every process of a DDP group runs the same calls in the same
order; only rank 0 logs, validates and writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from converseg_core.checkpoint import save_checkpoint
from converseg_core.files import atomic_write_text

from .augment import jitter_feature_statistics
from .cli import plain
from .datasets import ConverSegDataset
from .distributed import Dist, wrap_ddp
from .losses import DenseGroundingHead, TrainingLoss, training_loss
from .panels import save_panels
from .parts import set_train_mode, text_start_layer, trainable_parts
from .precision import mixed_precision
from .run_state import check_run_end, check_skipped, non_finite_parameters
from .schedule import lr_factor
from .step import TrainStep, blank_batch, drop_tokens
from .text_cache import TextFeatureCache
from .train_config import TrainConfig
from .trunk_cache import LEVELS, TrunkCache
from .validation import validate

log = logging.getLogger("training.train")

LOSS_TERMS = ("loss", "bce", "dice", "presence", "iou", "dense")
VAL_METRICS = ("giou", "ciou", "n_acc", "t_acc")


class TrainLoop:
    """Runs `cfg.steps` optimizer steps from `step` and writes last.pt, model.pt, val_metrics.json, panels and
    TensorBoard logs into `out_dir`."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model: nn.Module,
        dense_head: DenseGroundingHead | None,
        optimizer: torch.optim.Optimizer,
        text_cache: TextFeatureCache,
        trunk_cache: TrunkCache | None,
        val_ds: ConverSegDataset | None,
        d: Dist,
        device: torch.device,
        out_dir: Path,
        step: int,
    ) -> None:
        self.cfg, self.model, self.dense_head, self.optimizer = cfg, model, dense_head, optimizer
        self.text_cache, self.trunk_cache, self.val_ds = text_cache, trunk_cache, val_ds
        self.d, self.device, self.out_dir = d, device, out_dir
        self.last = out_dir / "last.pt"
        self.step = self.start_step = step
        self.text_start = text_start_layer(model, cfg)
        self.autocast, self.scaler = mixed_precision(device, cfg.amp)
        self.stepper = wrap_ddp(
            TrainStep(model, "image_encoder" in trainable_parts(model, cfg), self.text_start, dense_head),
            d,
            device,
            find_unused_parameters=True,
        )
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.writer = self.progress = None
        if d.main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tb"))
            if not cfg.no_progress:
                from tqdm import tqdm

                self.progress = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
        self.nan_run = self.nan_total = 0
        self.skipped = self.seen = 0
        self.last_val: dict = {}
        self.t_last, self.step_last = time.perf_counter(), step  # the last TensorBoard log (or the start)

    # ------------------------------------------------------------------------------------------- the loop

    def run(self, batches: Iterator[dict]) -> dict:
        """Train to cfg.steps, then check the run and write model.pt; returns the run's summary."""
        cfg = self.cfg
        set_train_mode(self.model, cfg)
        t_start = time.perf_counter()
        while self.step < cfg.steps:
            sums = self.optimizer_step(batches)
            self.step += 1
            if self.d.main:
                self.report(sums)
        check_skipped(self.skipped, self.seen, cfg, final=True)
        check_run_end(self.model, self.nan_run, self.last)
        seconds = time.perf_counter() - t_start
        return self.finish(seconds)

    def optimizer_step(self, batches: Iterator[dict]) -> dict[str, float]:
        """One optimizer step over cfg.grad_accum micro-batches; skipped (gradients dropped) when any
        micro-batch's loss is non-finite on any process. Returns the step's mean loss terms."""
        cfg = self.cfg
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(self.step, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        sums = dict.fromkeys(LOSS_TERMS, 0.0)
        bad = False
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            sync = self.d.world == 1 or micro == cfg.grad_accum - 1
            with nullcontext() if sync else self.stepper.no_sync():
                loss, terms, empty = self.micro_batch(batch, micro)
                if terms.dense is not None:
                    sums["dense"] += float(terms.dense) / cfg.grad_accum
                if empty:
                    loss = loss * 0.0
                else:
                    sums["bce"] += float(terms.mask_bce) / cfg.grad_accum
                    sums["dice"] += float(terms.mask_dice) / cfg.grad_accum
                    sums["presence"] += float(terms.presence_bce) / cfg.grad_accum
                    sums["iou"] += float(terms.iou) / cfg.grad_accum
                if self.d.all_finite(loss, self.device):
                    sums["loss"] += float(loss.detach()) / cfg.grad_accum
                else:
                    # Still backpropagate (through the same graph, so DDP's bookkeeping matches on every
                    # process); the gradients are thrown away below.
                    bad = True
                self.scaler.scale(loss / cfg.grad_accum).backward()
        if bad:
            self.skip_update()
        else:
            self.nan_run = 0
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return sums

    def micro_batch(self, batch: dict, micro: int) -> tuple[torch.Tensor, TrainingLoss, bool]:
        """Forward one micro-batch and its loss: (loss to backpropagate, its terms, whether every sample of
        the batch was bad and a zero-weight stand-in ran instead)."""
        cfg, device = self.cfg, self.device
        self.skipped += batch["num_skipped"]
        self.seen += batch["num_skipped"] + (0 if batch["empty"] else len(batch["prompt"]))
        check_skipped(self.skipped, self.seen, cfg)
        empty = batch["empty"]
        if empty:
            # Every process must still make the same forward/backward/all-reduce calls.
            batch = blank_batch(self.model.config, self.text_cache)
        if "feature_key" in batch:
            paths, mirrored = zip(*batch["feature_key"], strict=True)
            images = self.trunk_cache.lookup(list(paths), list(mirrored), device)
            if cfg.feature_jitter > 0:
                # Seeded like token dropout; the stride-32 map (the classifier's input) is left as it is.
                g = torch.Generator().manual_seed(cfg.seed * 999_983 + self.d.rank * 7919 + self.step * 64 + micro)
                images = [
                    f if level == "s32" else jitter_feature_statistics(f, cfg.feature_jitter, g)
                    for level, f in zip(LEVELS, images, strict=True)
                ]
        else:
            images = batch["image"].to(device, non_blocking=True)
        target = batch["mask_low"].to(device, non_blocking=True)
        presence_t = batch["presence"].to(device)
        text, am = self.text_cache.lookup(batch["prompt"], device)
        if cfg.token_dropout > 0:
            # Seeded by (seed, rank, step, micro-batch), so a resumed run draws the same tokens.
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.d.rank * 7919 + self.step * 64 + micro)
            am = drop_tokens(am, cfg.token_dropout, g)
        image_index = batch["image_index"].to(device)
        # Each embedding cell's share of each request's answer (the 4 x 4 low-res pixels it holds).
        dense_target = F.avg_pool2d(target, 4) if self.dense_head is not None else None
        with self.autocast():
            logits, iou_pred, presence, dense = self.stepper(images, image_index, text, am, dense_target)
        terms = training_loss(
            logits,
            iou_pred,
            presence,
            dense,
            target,
            presence_t,
            dice_weight=cfg.dice_weight,
            presence_weight=cfg.presence_weight,
            iou_weight=cfg.iou_weight,
            dense_weight=cfg.dense_weight,
        )
        return terms.total, terms, empty

    def skip_update(self) -> None:
        """Drop this step's gradients; stop after cfg.max_nan_steps non-finite steps in a row."""
        self.nan_run += 1
        self.nan_total += 1
        log.warning(
            "step %d: non-finite loss, update skipped (%d in a row, %d in all)",
            self.step,
            self.nan_run,
            self.nan_total,
        )
        if self.nan_run >= self.cfg.max_nan_steps:
            raise FloatingPointError(
                f"{self.nan_run} consecutive steps with a non-finite loss at step {self.step}; lower --lr, "
                f"check the data (last good checkpoint: {self.last})"
            )
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------------------------------- rank 0

    def report(self, sums: dict[str, float]) -> None:
        """Progress bar every step; TensorBoard, validation and last.pt at their intervals and the last step."""
        cfg, step = self.cfg, self.step
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(loss=f"{sums['loss']:.3f}", skipped=self.skipped)
        if step % cfg.log_every == 0 or step == cfg.steps:
            self.log_scalars(sums)
        if step % cfg.val_every == 0 or step == cfg.steps:
            self.last_val = self.validate()
        if step % cfg.save_every == 0 or step == cfg.steps:
            self.save()

    def log_scalars(self, sums: dict[str, float]) -> None:
        cfg, step, writer = self.cfg, self.step, self.writer
        now = time.perf_counter()
        for k, v in sums.items():
            writer.add_scalar(f"train/{k}", v, step)
        writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], step)
        samples = (step - self.step_last) * cfg.batch_size * cfg.grad_accum * self.d.world
        writer.add_scalar("train/samples_per_s", samples / (now - self.t_last), step)
        writer.add_scalar("train/skipped_samples", self.skipped, step)
        self.t_last, self.step_last = now, step

    def validate(self) -> dict:
        """Validation metrics (logged, written to val_metrics.json) and panels; {} without validation data."""
        if self.val_ds is None:
            return {}
        cfg, step, writer = self.cfg, self.step, self.writer
        acc, panels, skipped = validate(
            self.model, self.val_ds, self.text_cache, self.device, limit=cfg.val_samples,
            num_panels=cfg.num_panels, batch_size=cfg.batch_size, text_start=self.text_start,
        )
        set_train_mode(self.model, cfg)
        res = acc.to_dict()
        res["skipped"] = skipped
        o = res["overall"]
        values = [o[k] for k in VAL_METRICS]
        log.info("step %d val: gIoU %s cIoU %s N-acc %s T-acc %s (n=%d)", step, *values, o["n"])
        for k in VAL_METRICS:
            if o[k] is not None:
                writer.add_scalar(f"val/{k}", o[k], step)
        if panels:
            path = save_panels(panels, self.out_dir / "panels" / f"step_{step:07d}.png")
            writer.add_image("val/panels", np.asarray(Image.open(path)), step, dataformats="HWC")
        atomic_write_text(self.out_dir / "val_metrics.json", json.dumps({"step": step, **res}, indent=2))
        return res

    def save(self) -> None:
        """Write the resumable last.pt, unless the weights just gave a non-finite loss: then the last good
        last.pt stays for --resume."""
        if self.nan_run or non_finite_parameters(self.model):
            log.warning("step %d: weights not saved (non-finite loss or weights); %s is kept", self.step, self.last)
            return
        meta = plain({"train_config": dataclasses.asdict(self.cfg), "step": self.step, "val": self.last_val})
        extra = {"optimizer": self.optimizer.state_dict(), "step": self.step}
        if self.dense_head is not None:
            extra["dense_head"] = self.dense_head.state_dict()
        save_checkpoint(self.model, self.last, meta=meta, extra=extra)

    def finish(self, seconds: float) -> dict:
        """The run's summary; rank 0 validates if it never did, and writes model.pt (weights only)."""
        d, step = self.d, self.step
        result = {
            "step": step,
            "val": self.last_val,
            "skipped_samples": self.skipped,
            "nan_steps": self.nan_total,
            "train_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / max(1, step - self.start_step), 3),
        }
        if d.world > 1:
            checksums = d.checksums(self.params)
            result["ranks_in_sync"] = all(c == checksums[0] for c in checksums)
            if not result["ranks_in_sync"]:
                log.error("DDP processes ended with different weights: %s", checksums)
        if d.main:
            if self.progress is not None:
                self.progress.close()
            if not self.last_val and self.val_ds is not None:
                self.last_val = self.validate()
                result["val"] = self.last_val
            if not self.last.is_file():
                self.save()
            save_checkpoint(
                self.model,
                self.out_dir / "model.pt",
                meta={"train_config": dataclasses.asdict(self.cfg), "step": step, "val": self.last_val},
            )
            result["checkpoint"] = str(self.out_dir / "model.pt")
            if self.skipped:
                log.warning("%d bad samples were skipped during training (see the warnings above)", self.skipped)
            self.writer.close()
        d.close()
        return result
