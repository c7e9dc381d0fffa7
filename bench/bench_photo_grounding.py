"""Where a model's masks come from on photographs: its learned decoder, or the trunk's ImageNet concepts.

    .venv/bin/python bench/bench_photo_grounding.py --out bench/out/photo_grounding
    .venv/bin/python bench/bench_photo_grounding.py --data runs/v2/data/test --limit 1500 \
        --out bench/out/photo_grounding_v3        # the same on rendered test scenes

For every request with a target (negatives are skipped: this is about where the mask lies, not presence), one
model (torch backend, no request anchoring, presence ignored) gives three masks, each scored by IoU against
the target and by whether its highest value lies on the target ("pointed"):
- model: the shipped mask, mask logits above the model's mask threshold (the decoder's logits plus the
  concept prior at the model's learned scale; `training.evaluate` calls its IoU "masks alone");
- learned part: the same logits less the concept prior (what fusion and decoder, trained on renders, add; a
  model with mask refinement on keeps the refinement, which is computed from the full logits);
- concepts alone: the request-conditioned ImageNet concept prior of a model with concepts
  (converseg_core/modeling/concepts.py), standardised over the frame, above --prior-z: no weight trained
  on renders decides it, only the frozen trunk's classifier and MiniLM.
"chance" is the targets' mean share of the image: what pointing at random pixels scores. Rows: all requests
with a target, those marked as naming kinds the data engine renders (where the data says), entities.
Writes OUT/results.json and OUT/results.md."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a source checkout
from bench.machine import cpu_description  # noqa: E402

MASKS = ("model", "learned part", "concepts alone")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="torch checkpoint with concepts (default: the bundled model)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT / "tests" / "data" / "real_photos",
        help="any dataset training.evaluate reads (default: the real-photo set)",
    )
    p.add_argument("--limit", type=int, default=0, help="read at most this many requests (0: all)")
    p.add_argument(
        "--prior-z", type=float, default=1.0, help="the concepts-alone mask: standardised prior above this"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("bench/out/photo_grounding"), help="output folder")
    return p


def score(mask: np.ndarray, values: np.ndarray, target: np.ndarray) -> tuple[float, bool]:
    """IoU of `mask` with `target` (1.0 when both are empty), and whether `values` peaks on the target."""
    union = np.count_nonzero(mask | target)
    iou = np.count_nonzero(mask & target) / union if union else 1.0
    return float(iou), bool(target.flat[int(np.argmax(values))])


def measure(args: argparse.Namespace) -> tuple[list[dict], float]:
    """One row per request with a target, and the model's concept prior scale."""
    import torch
    from tqdm import tqdm

    from converseg_core.modeling.concepts import concept_prior
    from converseg_core.processing import preprocess, upsample_logits
    from converseg_core.segmenter import Segmenter
    from converseg_core.weights import DEFAULT_CHECKPOINT
    from training.evaluate import rendered_kind_group
    from training.records import read_records
    from training.sample_io import load_mask, load_rgb

    torch.set_num_threads(args.threads)
    seg = Segmenter.from_checkpoint(args.checkpoint or DEFAULT_CHECKPOINT, anchoring=False)
    model, cfg = seg.backend.model, seg.config
    if model.concepts is None:
        raise SystemExit(f"{args.checkpoint}: this model has no ImageNet concepts (a *_concepts variant has)")
    scale = float(model.concepts.prior_scale.detach())
    records = [r for r in read_records(args.data) if not r.negative]
    if args.limit > 0:
        records = records[: args.limit]
    if not records:
        raise SystemExit(f"{args.data}: no request with a target")
    by_image: dict[Path, list] = {}
    for r in records:
        by_image.setdefault(r.image, []).append(r)
    rows = []
    for path, group in tqdm(by_image.items(), desc="photo grounding", dynamic_ncols=True):
        image = load_rgb(path)
        h, w = image.shape[:2]
        pre = preprocess(image, img_size=cfg.img_size, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std)
        frame = seg.backend.prepare_frame(pre.tensor)
        feats, attn = seg.encode_texts([r.prompt for r in group])
        low_res, _, _ = seg.backend.decode(frame, feats, attn)
        with torch.inference_mode():
            prior = concept_prior(
                torch.from_numpy(frame.concept_tokens),
                torch.from_numpy(feats),
                torch.from_numpy(attn),
                low_res.shape[-1],
            ).numpy()

        logits, z = (
            upsample_logits(x, img_size=cfg.img_size, input_size=pre.input_size, original_size=(h, w))
            for x in (low_res, prior)
        )
        for j, r in enumerate(group):
            target = load_mask(r, h, w)
            learned = logits[j] - scale * z[j]
            masks = {
                "model": (logits[j] > seg.mask_threshold, logits[j]),
                "learned part": (learned > seg.mask_threshold, learned),
                "concepts alone": (z[j] > args.prior_z, z[j]),
            }
            row = {"id": r.sample_id, "prompt": r.prompt, "family": r.family, "share": float(target.mean())}
            row["rendered_kind"] = rendered_kind_group(r)
            for name, (mask, values) in masks.items():
                row[f"{name} iou"], row[f"{name} pointed"] = score(mask, values, target)
            rows.append(row)
    return rows, scale


def summarise(rows: list[dict]) -> list[dict]:
    groups = {"all with a target": rows}
    if any(r["rendered_kind"] is not None for r in rows):
        groups["rendered kinds"] = [r for r in rows if r["rendered_kind"] == "rendered"]
    groups["entities"] = [r for r in rows if r["family"] == "entities"]
    table = []
    for name, members in groups.items():
        if not members:
            continue
        line = {"requests": name, "n": len(members), "chance %": 100 * np.mean([r["share"] for r in members])}
        for m in MASKS:
            line[f"{m} IoU"] = 100 * np.mean([r[f"{m} iou"] for r in members])
            line[f"{m} pointed %"] = 100 * np.mean([r[f"{m} pointed"] for r in members])
        table.append(line)
    return table


def markdown(table: list[dict], args: argparse.Namespace, scale: float) -> str:
    cols = list(table[0])
    lines = [
        f"# Photo grounding: {args.data}",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_description()}",
        f"checkpoint {args.checkpoint or 'bundled default'}, concept prior scale {scale:.3f}, "
        f"concepts-alone mask at z > {args.prior_z}",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for line in table:
        cells = [
            v if isinstance(v, str) else (str(v) if isinstance(v, int) else f"{v:.1f}") for v in line.values()
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from converseg_core.files import atomic_write_text

    args = build_parser().parse_args(argv)
    rows, scale = measure(args)
    table = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "results.json", json.dumps({"table": table, "requests": rows}, indent=1))
    text = markdown(table, args, scale)
    atomic_write_text(args.out / "results.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
