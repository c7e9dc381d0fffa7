"""Distill a student image encoder from a teacher's embeddings (NanoSAM-style), on unlabeled images.

    python -m training.distill --images data/engine --out-dir runs/distill \\
        --teacher-checkpoint runs/teacher/model.pt --student converseg_edge --student-override img_size=256
    python -m training.distill --images photos/ --teacher-official mobile_sam.pt --teacher-model converseg_mobilesam

The student (an image encoder of any registered variant) learns to output the teacher's B x 256 x h x w
embedding with a Huber loss. Each model sees the same augmented picture pre-processed at its own img_size;
when the embedding sizes differ, the teacher's is average-pooled (or bilinearly resized) to the student's.
`out_dir/last.pt` (resumable, optimizer inside) and `out_dir/model.pt` are ConverSeg checkpoints of the
student variant whose image encoder is trained; take it into training with
`--init out_dir/model.pt:image_encoder`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from converseg_core import list_models
from converseg_core.build import build_model
from converseg_core.checkpoint import load_official_weights, save_checkpoint
from converseg_core.errors import ConverSegError
from converseg_core.files import atomic_write_text

from .augment import AugmentConfig
from .cli import arg, config_parser, parse_overrides, plain, require_at_least_one, require_finite
from .datasets import ImageFolderDataset, StepSampler, collate_images
from .distributed import setup_distributed, wrap_ddp
from .losses import distill_loss
from .parts import load_parts
from .precision import mixed_precision
from .records import list_images
from .run_state import resume_state
from .schedule import lr_factor

log = logging.getLogger("training.distill")


@dataclass
class DistillConfig:
    images: str = arg(help="unlabeled images: a folder (searched recursively) or data engine output")
    out_dir: str = arg("runs/distill", help="run folder: last.pt (resumable), model.pt, TensorBoard logs")
    student: str = arg(
        "converseg_edge", help="student variant (its image encoder is trained)", choices=list_models()
    )
    student_override: list[str] = arg(
        [], help="student config overrides KEY=VALUE (e.g. img_size=256)", nargs="*"
    )
    teacher_checkpoint: str | None = arg(None, help="teacher: a ConverSeg checkpoint (ours)")
    teacher_official: str | None = arg(
        None, help="teacher: official SAM / MobileSAM weights (with --teacher-model)"
    )
    teacher_model: str = arg(
        "converseg_mobilesam",
        help="teacher variant for --teacher-official (or random, for tests)",
        choices=list_models(),
    )
    teacher_override: list[str] = arg(
        [], help="teacher config overrides KEY=VALUE (fresh or official teacher)", nargs="*"
    )
    init_student: str | None = arg(
        None, help="start the student's image encoder from this ConverSeg checkpoint"
    )
    steps: int = arg(5000, help="optimizer steps")
    batch_size: int = arg(8, help="images per step per process")
    lr: float = arg(1e-3, help="peak learning rate")
    weight_decay: float = arg(0.01, help="AdamW weight decay")
    warmup_steps: int = arg(100, help="linear warm-up steps")
    min_lr_ratio: float = arg(0.05, help="cosine decay floor as a fraction of the peak")
    grad_clip: float = arg(1.0, help="gradient norm clip (0 disables)")
    no_augment: bool = arg(False, help="disable crop / flip / colour augmentation")
    amp: str = arg("auto", help="autocast dtype on a GPU", choices=["auto", "bf16", "fp16", "none"])
    device: str = arg("auto", help="cpu, cuda, cuda:N or auto")
    num_workers: int = arg(2, help="DataLoader worker processes")
    seed: int = arg(0, help="seed of the data order and augmentation")
    log_every: int = arg(10, help="steps between TensorBoard scalars")
    save_every: int = arg(250, help="steps between resumable checkpoints")
    resume: bool = arg(False, help="continue from out_dir/last.pt when it exists")
    max_nan_steps: int = arg(10, help="stop after this many consecutive non-finite losses")
    no_progress: bool = arg(False, help="no tqdm progress bar")
    threads: int = arg(0, help="torch CPU threads per process (0: cores / processes)")


def build_teacher(cfg: DistillConfig) -> nn.Module:
    """The teacher ConverSeg model (only its image encoder runs), frozen, in eval mode."""
    if cfg.teacher_checkpoint and cfg.teacher_official:
        raise SystemExit("give --teacher-checkpoint or --teacher-official, not both")
    if cfg.teacher_checkpoint:
        if cfg.teacher_override:
            raise SystemExit("--teacher-override applies to a fresh or official teacher, not a checkpoint")
        teacher = build_model(checkpoint=cfg.teacher_checkpoint, pretrained_text=False)
    else:
        teacher = build_model(
            cfg.teacher_model, pretrained_text=False, **parse_overrides(cfg.teacher_override)
        )
        if cfg.teacher_official:
            load_official_weights(teacher, cfg.teacher_official)
        else:
            log.warning(
                "no teacher weights given: distilling from a RANDOM %s (only useful for tests)",
                cfg.teacher_model,
            )
    return teacher.eval().requires_grad_(False)


def match_embedding(teacher: torch.Tensor, size: int) -> torch.Tensor:
    if teacher.shape[-1] == size:
        return teacher
    if teacher.shape[-1] > size and teacher.shape[-1] % size == 0:
        return F.adaptive_avg_pool2d(teacher, size)
    return F.interpolate(teacher, size=(size, size), mode="bilinear", align_corners=False)


def distill(cfg: DistillConfig) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    require_at_least_one(cfg, "steps", "log_every", "save_every")
    require_finite(cfg, positive=("lr",), non_negative=("weight_decay", "grad_clip", "min_lr_ratio"))
    d, device = setup_distributed(cfg.device, cfg.threads)
    out_dir = Path(cfg.out_dir)
    if d.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "distill_config.json", json.dumps(dataclasses.asdict(cfg), indent=2))

    images = list_images(cfg.images)
    teacher = build_teacher(cfg).to(device)
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student, pretrained_text=False, **parse_overrides(cfg.student_override))
    if cfg.init_student:
        load_parts(student, f"{cfg.init_student}:image_encoder")
    if (
        teacher.config.pixel_mean != student.config.pixel_mean
        or teacher.config.pixel_std != student.config.pixel_std
    ):
        raise SystemExit(
            "teacher and student normalize pixels differently; give them the same pixel_mean/std"
        )
    student.to(device)
    for name, module in student.named_children():
        if name != "image_encoder":  # the encoder keeps its own frozen parts (TinyViT's unused head)
            module.requires_grad_(False)
    params = [p for p in student.image_encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    step = 0
    last = out_dir / "last.pt"
    if cfg.resume and last.is_file():
        step = resume_state(last, student, optimizer)
        log.info("resumed from %s at step %d", last, step)

    s_size, t_size = student.config.img_size, teacher.config.img_size
    ds = ImageFolderDataset(
        images,
        student.config,
        sizes=[s_size, t_size],
        augment_cfg=None if cfg.no_augment else AugmentConfig(),
        seed=cfg.seed,
    )
    sampler = StepSampler(
        len(ds), batch_size=cfg.batch_size, seed=cfg.seed, rank=d.rank, world=d.world, start_step=step
    )
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
        persistent_workers=cfg.num_workers > 0,
    )
    autocast, scaler = mixed_precision(device, cfg.amp)
    encoder = wrap_ddp(student.image_encoder, d, device)
    writer = progress = None
    if d.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"))
        if not cfg.no_progress:
            from tqdm import tqdm

            progress = tqdm(total=cfg.steps, initial=step, desc="distill", dynamic_ncols=True)

    def save(step_now: int, loss_now: float) -> None:
        meta = {
            "distill_config": dataclasses.asdict(cfg),
            "step": step_now,
            "loss": loss_now,
            "teacher": teacher.config.name,
        }
        save_checkpoint(
            student, last, meta=meta, extra={"optimizer": optimizer.state_dict(), "step": step_now}
        )

    student.train()
    it = iter(loader)
    nan_run, skipped, loss_value = 0, 0, float("nan")
    t0 = time.perf_counter()
    while step < cfg.steps:
        for g in optimizer.param_groups:
            g["lr"] = cfg.lr * lr_factor(step, cfg)  # type: ignore[arg-type]
        batch = next(it)
        skipped += batch["num_skipped"]
        optimizer.zero_grad(set_to_none=True)
        if batch["empty"]:
            loss = sum(p.sum() * 0.0 for p in params)
        else:
            with torch.no_grad(), autocast():
                target = teacher.encode_image(batch["image_1"].to(device, non_blocking=True)).embedding.float()
            with autocast():
                pred = encoder(batch["image_0"].to(device, non_blocking=True))
                if isinstance(pred, tuple):  # encoders with a detail path: the embedding is what is distilled
                    pred = pred[0]
            loss = distill_loss(pred, match_embedding(target, pred.shape[-1]))
        if not d.all_finite(loss, device):
            nan_run += 1
            log.warning("step %d: non-finite distillation loss, update skipped (%d in a row)", step, nan_run)
            if nan_run >= cfg.max_nan_steps:
                raise FloatingPointError(
                    f"{nan_run} consecutive non-finite losses at step {step}; lower --lr"
                )
            loss = sum(p.sum() * 0.0 for p in params)
            scaler.scale(loss).backward()
            optimizer.zero_grad(set_to_none=True)
        else:
            nan_run = 0
            scaler.scale(loss).backward()
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            loss_value = float(loss.detach())
        step += 1
        if d.main:
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}")
            if step % cfg.log_every == 0 or step == cfg.steps:
                writer.add_scalar("distill/huber", loss_value, step)
                writer.add_scalar("distill/lr", optimizer.param_groups[0]["lr"], step)
                writer.add_scalar("distill/skipped_images", skipped, step)
            if step % cfg.save_every == 0 or step == cfg.steps:
                save(step, loss_value)
    result = {
        "step": step,
        "loss": loss_value,
        "skipped_images": skipped,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if d.main:
        if progress is not None:
            progress.close()
        if not last.is_file():
            save(step, loss_value)
        meta = {
            "distill_config": dataclasses.asdict(cfg),
            "step": step,
            "loss": loss_value,
            "teacher": teacher.config.name,
        }
        save_checkpoint(student, out_dir / "model.pt", meta=plain(meta))
        result["checkpoint"] = str(out_dir / "model.pt")
        writer.close()
    d.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = config_parser(DistillConfig, __doc__)
    cfg = DistillConfig(**vars(parser.parse_args(argv)))
    try:
        result = distill(cfg)
    except (FloatingPointError, ConverSegError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
