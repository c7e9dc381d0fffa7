"""Same frames and queries through PyTorch, ONNX Runtime and (where present) TensorRT: errors, mask IoU, latency.

    python export/verify.py --checkpoint runs/edge/best.pt --onnx-dir out/onnx_edge [--trt-dir out/trt_edge]
    python export/verify.py --model converseg_edge --img-size 512          # random weights, exports first
    python export/verify.py ... --images data/frames --queries "the mug" "a knife"

Every backend gets identical inputs through the shared numpy pre-processing and tokenizer; PyTorch is the
reference. Errors are on the decoder's low-res logits (max |diff| / max |reference|), the presence logit and
the IoU score; masks are compared at camera resolution after the shared post-processing. Latency is the
median of --repeats runs: "new frame" = pre-process + image encoder + decoder + post-process (query cached),
"new query" = text encoder + decoder + post-process (frame cached). Exit 1 if a backend misses the limits.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converseg_core.backends.base import Backend
from converseg_core.errors import BackendUnavailableError, ConverSegError
from converseg_core.processing import preprocess, read_rgb, sigmoid, upsample_logits
from converseg_core.registry import list_models
from converseg_core.tokenizer import QueryTokenizer
from converseg_export.calibration import find_images

log = logging.getLogger("verify")

DEFAULT_QUERIES = (
    "the red mug",
    "where can I safely put the knife down?",
    "something to cut the bread with",
)
# ONNX Runtime float32 should match PyTorch to ~1e-5; FP16 / INT8 TensorRT engines legitimately differ more,
# so the mask IoU is the limit that matters for them.
DEFAULT_MAX_REL_ERROR = 1e-3
DEFAULT_MIN_MASK_IOU = 0.98


@dataclass
class BackendRun:
    name: str
    device: str
    low_res: list[np.ndarray] = field(default_factory=list)  # per frame: Q x 1 x L x L
    presence: list[np.ndarray] = field(default_factory=list)  # per frame: Q
    iou: list[np.ndarray] = field(default_factory=list)  # per frame: Q x 1
    masks: list[np.ndarray] = field(default_factory=list)  # per frame: Q x H x W bool
    new_frame_ms: list[float] = field(default_factory=list)
    new_query_ms: list[float] = field(default_factory=list)


def run_backend(
    backend: Backend,
    name: str,
    device: str,
    frames: list[np.ndarray],
    tokens,
    repeats: int,
) -> BackendRun:
    cfg = backend.config
    run = BackendRun(name=name, device=device)

    # One query at a time, as the Segmenter does: float32 logits of every query at full size add up.
    def post(low, pre):
        size = dict(img_size=cfg.img_size, input_size=pre.input_size, original_size=pre.original_size)
        return np.stack(
            [upsample_logits(low[i : i + 1], **size)[0] > cfg.mask_threshold for i in range(len(low))]
        )

    for frame in frames:
        pre = preprocess(frame, img_size=cfg.img_size, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std)
        context = backend.prepare_frame(pre.tensor)
        text = backend.encode_text(tokens.input_ids, tokens.attention_mask)
        low, iou, presence = backend.decode(context, text, tokens.attention_mask)
        run.low_res.append(low)
        run.iou.append(iou)
        run.presence.append(presence)
        run.masks.append(post(low, pre))
    frame = frames[0]
    for _ in range(repeats + 1):  # the first round warms up (allocations, lazy kernels) and is dropped
        started = time.perf_counter()
        pre = preprocess(frame, img_size=cfg.img_size, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std)
        context = backend.prepare_frame(pre.tensor)
        low, _, _ = backend.decode(context, text, tokens.attention_mask)
        post(low, pre)
        middle = time.perf_counter()
        text = backend.encode_text(tokens.input_ids, tokens.attention_mask)
        low, _, _ = backend.decode(context, text, tokens.attention_mask)
        post(low, pre)
        ended = time.perf_counter()
        run.new_frame_ms.append((middle - started) * 1e3)
        run.new_query_ms.append((ended - middle) * 1e3)
    run.new_frame_ms, run.new_query_ms = run.new_frame_ms[1:], run.new_query_ms[1:]
    return run


def compare(run: BackendRun, ref: BackendRun) -> dict[str, float]:
    rel = max(
        float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-6))
        for a, b in zip(run.low_res, ref.low_res, strict=True)
    )
    presence = max(float(np.max(np.abs(a - b))) for a, b in zip(run.presence, ref.presence, strict=True))
    iou_score = max(float(np.max(np.abs(a - b))) for a, b in zip(run.iou, ref.iou, strict=True))
    ious = []
    for masks, ref_masks in zip(run.masks, ref.masks, strict=True):
        for a, b in zip(masks, ref_masks, strict=True):
            union = np.logical_or(a, b).sum()
            ious.append(1.0 if union == 0 else float(np.logical_and(a, b).sum() / union))
    agree = np.mean(
        [
            np.array_equal(sigmoid(a) >= 0.5, sigmoid(b) >= 0.5)
            for a, b in zip(run.presence, ref.presence, strict=True)
        ]
    )
    return {
        "logits_rel_error": rel,
        "presence_abs_error": presence,
        "iou_score_abs_error": iou_score,
        "mask_iou_min": min(ious),
        "mask_iou_mean": float(np.mean(ious)),
        "presence_agreement": float(agree),
    }


def load_frames(images: Path | None, count: int) -> list[np.ndarray]:
    if images is not None:
        return [read_rgb(p) for p in find_images(images)[:count]]
    from converseg_export.export_onnx import camera_like_image

    return [camera_like_image(640, seed=s) for s in range(count)]


def config_differences(want, got) -> list[str]:
    """'field: checkpoint X, export Y' for each config field that differs."""
    a, b = want.to_dict(), got.to_dict()
    return [f"{k}: checkpoint {a[k]!r}, export {b.get(k)!r}" for k in a if a[k] != b.get(k)]


def verify(
    *,
    model,
    onnx_dir: Path,
    trt_dir: Path | None,
    frames: list[np.ndarray],
    queries: list[str],
    repeats: int,
    threads: int | None,
    max_rel_error: float,
    min_mask_iou: float,
) -> tuple[list[tuple[BackendRun, dict[str, float] | None]], list[str], bool]:
    """Returns ((run, errors vs torch) per backend, notes on skipped backends, passed)."""
    import torch

    from converseg_core.backends.onnxruntime_backend import OnnxRuntimeBackend
    from converseg_core.backends.torch_backend import TorchBackend

    if threads:
        torch.set_num_threads(threads)
    ort_backend = OnnxRuntimeBackend.from_dir(onnx_dir, num_threads=threads)
    tokenizer = QueryTokenizer.from_file(ort_backend.tokenizer_path)
    tokens = tokenizer.encode(queries, model.config.max_query_tokens)
    ref = run_backend(TorchBackend(model), "torch", "cpu (eager)", frames, tokens, repeats)
    results: list[tuple[BackendRun, dict[str, float] | None]] = [(ref, None)]
    runs = [
        (
            ort_backend,
            "onnxruntime",
            ",".join(p.replace("ExecutionProvider", "") for p in ort_backend.providers),
        )
    ]
    notes = []
    quantized = sorted(ort_backend.manifest.quantization.get("graphs", {}))
    if quantized:
        runs[0] = (ort_backend, "onnxruntime", runs[0][2] + f", INT8 {'+'.join(quantized)}")
        notes.append(
            f"onnxruntime: {onnx_dir} has INT8 graphs ({', '.join(quantized)}): its errors are reported, not "
            "judged against float32 limits; its accuracy check is `quantization.accuracy` in its manifest.json "
            "(export/quantize_onnx.py --data)"
        )
    if trt_dir is not None:
        try:
            from converseg_core.backends.tensorrt_backend import TensorRTBackend

            trt_backend = TensorRTBackend.from_dir(trt_dir)
            runs.append(
                (
                    trt_backend,
                    "tensorrt",
                    f"{trt_backend.side_file.gpu_name} {trt_backend.side_file.precision}",
                )
            )
        except BackendUnavailableError as exc:
            notes.append(f"tensorrt: not run here ({exc})")
    else:
        notes.append("tensorrt: not run (no --trt-dir)")
    passed = True
    for backend, name, _ in runs:
        stale = config_differences(model.config, backend.config)
        if stale:
            # Raw outputs can match while the calibrated presence rule differs: a folder exported before
            # training.calibrate rewrote the checkpoint answers with the old rule. Parity cannot see that.
            notes.append(
                f"{name}: its model config differs from the checkpoint's ({'; '.join(stale)}): exported from "
                "another or an older version of the checkpoint; export it again"
            )
            passed = False
    for backend, name, device in runs:
        run = run_backend(backend, name, device, frames, tokens, repeats)
        errors = compare(run, ref)
        # Reduced-precision TensorRT engines are judged on masks only; float32 paths on logits too.
        precise = (
            name == "onnxruntime"
            or getattr(backend, "side_file", None)
            and backend.side_file.precision == "fp32"
        )
        ok = errors["mask_iou_min"] >= min_mask_iou and (
            not precise or errors["logits_rel_error"] <= max_rel_error
        )
        if name == "onnxruntime" and quantized:
            ok = True
        passed &= ok
        results.append((run, errors))
    return results, notes, passed


def format_table(results, notes) -> str:
    lines = [
        "| backend | device | logits rel. err. | presence abs. err. | mask IoU min / mean | new frame ms | new query ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, errors in results:
        frame_ms = statistics.median(run.new_frame_ms)
        query_ms = statistics.median(run.new_query_ms)
        if errors is None:
            lines.append(
                f"| {run.name} | {run.device} | reference | reference | reference | {frame_ms:.1f} | {query_ms:.1f} |"
            )
        else:
            lines.append(
                f"| {run.name} | {run.device} | {errors['logits_rel_error']:.2e} | {errors['presence_abs_error']:.2e} | "
                f"{errors['mask_iou_min']:.4f} / {errors['mask_iou_mean']:.4f} | {frame_ms:.1f} | {query_ms:.1f} |"
            )
    return "\n".join(lines + [f"- {n}" for n in notes])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="the checkpoint the ONNX folder was exported from")
    source.add_argument(
        "--model", choices=list_models(), help="random-weight variant: exported first, then verified"
    )
    parser.add_argument("--img-size", type=int, default=None, help="img_size override (with --model)")
    parser.add_argument(
        "--onnx-dir", type=Path, default=None, help="ONNX folder (required with --checkpoint)"
    )
    parser.add_argument(
        "--trt-dir", type=Path, default=None, help="TensorRT engine folder (checked where TensorRT exists)"
    )
    parser.add_argument(
        "--images", type=Path, default=None, help="folder of frames (default: synthetic 640x480)"
    )
    parser.add_argument("--num-images", type=int, default=2, help="frames used at most")
    parser.add_argument(
        "--queries", nargs="+", default=list(DEFAULT_QUERIES), help="queries, all run on every frame"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per backend (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ONNX Runtime")
    parser.add_argument(
        "--max-rel-error", type=float, default=DEFAULT_MAX_REL_ERROR, help="limit for float32 backends"
    )
    parser.add_argument(
        "--min-mask-iou", type=float, default=DEFAULT_MIN_MASK_IOU, help="limit for every backend"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from converseg_core.build import build_model

    try:
        if args.checkpoint is not None:
            if args.onnx_dir is None:
                print("error: --checkpoint needs --onnx-dir (the folder exported from it)", file=sys.stderr)
                return 2
            model = build_model(checkpoint=args.checkpoint)
            onnx_dir = args.onnx_dir
        else:
            from converseg_export.export_onnx import export_model

            model = build_model(args.model, **({"img_size": args.img_size} if args.img_size else {}))
            onnx_dir = args.onnx_dir or Path(tempfile.mkdtemp(prefix="converseg_verify_"))
            export_model(model, onnx_dir, source={"model": args.model}, num_threads=args.threads)
        model.eval()
        results, notes, passed = verify(
            model=model,
            onnx_dir=onnx_dir,
            trt_dir=args.trt_dir,
            frames=load_frames(args.images, args.num_images),
            queries=args.queries,
            repeats=args.repeats,
            threads=args.threads,
            max_rel_error=args.max_rel_error,
            min_mask_iou=args.min_mask_iou,
        )
    except ConverSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{model.config.name} at {model.config.img_size}, {len(args.queries)} queries, onnx: {onnx_dir}")
    print(format_table(results, notes))
    print(
        "PASS"
        if passed
        else f"FAIL: a backend is over the limits (rel. error {args.max_rel_error}, IoU {args.min_mask_iou})"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
