"""Validation during training: metrics at network-input resolution and overlay panels, a fast proxy of
training.evaluate (which scores at camera resolution through the Segmenter)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .datasets import ConverSegDataset, collate
from .metrics import MetricAccumulator, SampleResult
from .panels import make_panel
from .step import finish_text
from .text_cache import TextFeatureCache


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
        out = model.decode(emb, text, am, image_index=batch["image_index"].to(device))
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
