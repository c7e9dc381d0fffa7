"""Quantize the graphs of an ONNX export to INT8 for the CPU, and measure what it costs against float32.

    python -m export.quantize_onnx --onnx-dir out/onnx_edge --out out/onnx_edge_int8 \\
        --calib-images runs/default/data/train/shard-00000/images \\
        --data runs/default/data/test          # accuracy checked against float32 on 1,000 test requests
    python -m export.quantize_onnx --onnx-dir out/onnx_edge --out out/onnx_edge_int8 \\
        --graphs text_encoder decoder          # per-request graphs only: no calibration images needed

Run from the repository root of a source checkout: the agreement and accuracy checks use training/ (its
metrics and evaluation), which is not installed.

Two kinds of ONNX Runtime quantization, each where it runs fastest on the CPU:
- per-frame graphs (image_encoder, image_context): static INT8. Weights become int8 per output channel;
  activations become uint8 with ranges calibrated once on --calib-images (camera-like images, pre-processed
  exactly as at run time; image_context is calibrated on the float32 encoder's embeddings of them). The
  graphs run as QLinearConv / QGemm chains, about 1.5x faster than float32 at 512 on a VNNI x86 CPU. (The
  dynamic alternative is slower than float: ConvInteger ran 203 against 21 ms.)
- per-request graphs (text_encoder, decoder): dynamic INT8. int8 weights (text encoder per channel, decoder
  per tensor: ONNX Runtime's per-channel kernel refuses the decoder's 3-D weight matmuls), activations
  quantized per tensor at run time, MatMulInteger. No calibration: requests vary too much for fixed ranges.
The folder loads in the runtime exactly like the float32 one (`converseg segment --backend onnxruntime`).

With --data (a dataset with target masks), both folders are evaluated on the same requests with
training.evaluate's metrics, and the result is refused (exit 1, manifest.failed.json instead of
manifest.json) when gIoU, N-acc or T-acc drop by more than the limits. Calibrate and evaluate on different
scenes (e.g. train images and the test set). Agreement with float32 (mask IoU between the two exports'
low-res masks, same presence decisions) is recorded as well; it is not the gate, because an under-trained
model's logits sit near the threshold and its masks move visibly while its accuracy does not. Without --data
only the agreement on the export's synthetic test frame is recorded, and accuracy is NOT checked.

uint8 x int8 products can saturate on x86 CPUs without VNNI (AVX2 / AVX-512 before Cascade Lake); check the
accuracy with --data on the machine that will run the folder. TensorRT does not take these graphs (ONNX
Runtime's integer ops): build TensorRT engines from the float32 export, where `build_trt.py --precision int8`
calibrates its own INT8.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from converseg_core.anchoring import copy_sidecar
from converseg_core.artifacts import MANIFEST_NAME, STAGES, OnnxManifest
from converseg_core.backends.onnxruntime_backend import OnnxRuntimeBackend
from converseg_core.errors import ConverSegError, InputError
from converseg_core.processing import preprocess, presence_probability, read_rgb
from converseg_core.tokenizer import QueryTokenizer

log = logging.getLogger("quantize_onnx")


@dataclass(frozen=True)
class GraphQuantization:
    """How one graph is quantized (the module docstring says why)."""

    static: bool  # calibrated activation ranges (needs images) or ranges measured at run time
    per_channel: bool  # int8 weights per output channel or per tensor

    def describe(self, calibration: str = "") -> str:
        weights = "per output channel" if self.per_channel else "per tensor"
        if self.static:
            return f"onnxruntime static INT8 (QOperator): int8 weights {weights}, uint8 activations {calibration}"
        return f"onnxruntime dynamic INT8: int8 weights {weights}, uint8 activations quantized per tensor at run time"


QUANTIZABLE = {
    "image_encoder": GraphQuantization(static=True, per_channel=True),
    "image_context": GraphQuantization(static=True, per_channel=True),
    "text_encoder": GraphQuantization(static=False, per_channel=True),
    "decoder": GraphQuantization(static=False, per_channel=False),
}
DEFAULT_GRAPHS = tuple(QUANTIZABLE)
PER_REQUEST_GRAPHS = tuple(stage for stage, how in QUANTIZABLE.items() if not how.static)
PER_FRAME_GRAPHS = tuple(stage for stage, how in QUANTIZABLE.items() if how.static)
DEFAULT_CALIB_COUNT = 64
# ONNX Runtime's calibrators. Its entropy calibrator is not offered: on the default model it wrote graphs
# byte-identical to minmax's.
CALIB_METHODS = ("percentile", "minmax")
# Largest accepted loss against the float32 export on the same requests, in points (gIoU; N-acc and T-acc
# in percent). Measured costs on the default model are in docs/EXPORT.md.
DEFAULT_MAX_GIOU_DROP = 1.0
DEFAULT_MAX_ACC_DROP = 2.0
ACCURACY_KEYS = ("giou", "ciou", "n_acc", "t_acc")


class QuantizationError(ConverSegError):
    """The quantized graphs lose more accuracy than the limits allow against the float32 export, or cannot run."""


@dataclass
class Agreement:
    """Quantized vs float32 export on the same frames and requests."""

    source: str  # what the requests were: a dataset path, or "synthetic" (export's test frame and queries)
    requests: int
    mask_iou_median: float
    mask_iou_mean: float
    mask_iou_min: float
    presence_agreement: float  # fraction of requests with the same present / absent decision
    presence_prob_max_abs_diff: float


def quantize_dynamic_graph(src: Path, dst: Path, *, per_channel: bool) -> None:
    """Dynamic INT8 quantization of one graph file (ONNX Runtime's quantizer)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)


def quantize_static_graph(
    src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], *, per_channel: bool, calib_method: str
) -> None:
    """Static INT8 quantization of one graph file: activation ranges from running `feeds` (one input dict
    per calibration image) through it; QOperator format (QLinearConv, QGemm), uint8 activations."""
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="converseg_quant_") as tmp:
        prepared = Path(tmp) / src.name
        quant_pre_process(str(src), str(prepared))  # shape inference and graph clean-up, as ORT recommends
        quantize_static(
            str(prepared),
            str(dst),
            Reader(),
            quant_format=QuantFormat.QOperator,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            calibrate_method=methods[calib_method],
            # Not CalibMaxIntermediateOutputs: ONNX Runtime 1.31's MinMax calibrator drops the collected
            # activations at that count without reducing them, so only the last partial group would count.
        )


def calibration_feeds(
    reference: OnnxRuntimeBackend, images: Path, count: int, graphs: Sequence[str]
) -> tuple[dict[str, list[dict[str, np.ndarray]]], int]:
    """Inputs of the static graphs for `count` images of `images` (a seeded choice over the whole folder),
    pre-processed as at run time; image_context gets the float32 encoder's embeddings of the same images.
    Returns (graph -> feeds, number of images)."""
    from tqdm import tqdm

    from converseg_export.calibration import CalibrationBatcher, find_images

    config, manifest = reference.config, reference.manifest
    batcher = CalibrationBatcher(
        find_images(images),
        preprocess=lambda rgb: (
            preprocess(
                rgb, img_size=config.img_size, pixel_mean=config.pixel_mean, pixel_std=config.pixel_std
            ).tensor
        ),
        input_shape=manifest.graphs["image_encoder"].inputs[0].shape,
        max_images=count,
    )
    encoder_input = manifest.graphs["image_encoder"].inputs[0].name
    context_inputs = [t.name for t in manifest.graphs["image_context"].inputs]
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"image_encoder": [], "image_context": []}
    for batch in tqdm(batcher, total=batcher.num_batches, desc="calibration images", unit="img"):
        feeds["image_encoder"].append({encoder_input: batch})
        if "image_context" in graphs:
            features = reference.encode_image(batch)
            feeds["image_context"].append(dict(zip(context_inputs, features, strict=True)))
    return {stage: feeds[stage] for stage in graphs if QUANTIZABLE[stage].static}, batcher.num_images


def synthetic_requests(config) -> Iterator[tuple[np.ndarray, list[str]]]:
    """The export's parity frame and queries: a check that the graphs run, meaningless for random weights."""
    from converseg_export.export_onnx import CHECK_QUERIES, TRACE_QUERIES, camera_like_image

    queries = [q for group in CHECK_QUERIES for q in group] + list(TRACE_QUERIES)
    yield camera_like_image(config.img_size), queries


def dataset_requests(data: Path, limit: int) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(frame, its requests) from a training dataset (data engine folder, .jsonl, items.json, COCO), frames in
    order, until `limit` requests."""
    from training.records import read_records

    by_image: dict[Path, list[str]] = {}
    for record in read_records(data):
        by_image.setdefault(record.image, []).append(record.prompt)
    if not by_image:
        raise InputError(f"{data} has no samples")
    left = limit
    for path, prompts in by_image.items():
        if left <= 0:
            return
        yield read_rgb(path), prompts[:left]
        left -= len(prompts[:left])


def measure_agreement(
    reference: OnnxRuntimeBackend,
    quantized: OnnxRuntimeBackend,
    tokenizer: QueryTokenizer,
    requests: Iterator[tuple[np.ndarray, list[str]]],
    *,
    source: str,
) -> Agreement:
    from training.metrics import batch_iou_counts

    config = reference.config
    ious: list[float] = []
    same: list[bool] = []
    prob_diff = 0.0
    for rgb, queries in requests:
        tensor = preprocess(
            rgb, img_size=config.img_size, pixel_mean=config.pixel_mean, pixel_std=config.pixel_std
        ).tensor
        tokens = tokenizer.encode(queries, config.max_query_tokens)
        out = []
        for backend in (reference, quantized):
            frame = backend.prepare_frame(tensor)
            text = backend.encode_text(tokens.input_ids, tokens.attention_mask)
            logits, iou, presence = backend.decode(frame, text, tokens.attention_mask)
            p = presence_probability(presence, iou, config.presence_score_weight)
            out.append((logits[:, 0] > config.mask_threshold, p))
        (ref_masks, ref_p), (q_masks, q_p) = out
        inter, union = batch_iou_counts(ref_masks, q_masks)
        # Two empty masks agree perfectly (training.metrics' convention).
        ious += [1.0 if u == 0 else float(i / u) for i, u in zip(inter, union, strict=True)]
        threshold = config.presence_threshold
        same += list((ref_p >= threshold) == (q_p >= threshold))
        prob_diff = max(prob_diff, float(np.max(np.abs(ref_p - q_p))))
    if not ious:
        raise InputError("no requests to compare the quantized graphs on")
    return Agreement(
        source=source,
        requests=len(ious),
        mask_iou_median=round(float(np.median(ious)), 4),
        mask_iou_mean=round(float(np.mean(ious)), 4),
        mask_iou_min=round(float(np.min(ious)), 4),
        presence_agreement=round(float(np.mean(same)), 4),
        presence_prob_max_abs_diff=round(prob_diff, 4),
    )


def compare_accuracy(
    reference_dir: Path, quantized_dir: Path, data: Path, limit: int, threads: int | None
) -> dict[str, dict[str, float | None]]:
    """training.evaluate's overall metrics for both exports on the same first `limit` samples of `data`."""
    import tempfile

    from training.evaluate import EvalConfig, evaluate

    overall = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in (("float32", reference_dir), ("quantized", quantized_dir)):
            metrics = evaluate(
                EvalConfig(
                    checkpoint=str(folder),
                    data=str(data),
                    out_dir=str(Path(tmp) / name),
                    backend="onnxruntime",
                    limit=limit,
                    num_panels=0,
                    name=name,
                    threads=threads or 0,
                )
            )
            overall[name] = {k: metrics["overall"][k] for k in ("n", *ACCURACY_KEYS)}
    overall["drop"] = {
        k: None
        if overall["float32"][k] is None or overall["quantized"][k] is None
        else round(overall["float32"][k] - overall["quantized"][k], 2)
        for k in ACCURACY_KEYS
    }
    return overall


def accuracy_problems(drop: dict[str, float | None], max_giou_drop: float, max_acc_drop: float) -> list[str]:
    """The limits a measured drop breaks (an empty list: accepted)."""
    limits = {"giou": max_giou_drop, "n_acc": max_acc_drop, "t_acc": max_acc_drop}
    return [
        f"{key} drops {drop[key]} points (limit {limit})"
        for key, limit in limits.items()
        if drop.get(key) is not None and drop[key] > limit
    ]


def quantize_export(
    onnx_dir: str | Path,
    out: str | Path,
    *,
    graphs: Sequence[str] = DEFAULT_GRAPHS,
    data: str | Path | None = None,
    limit: int = 1000,
    max_giou_drop: float = DEFAULT_MAX_GIOU_DROP,
    max_acc_drop: float = DEFAULT_MAX_ACC_DROP,
    num_threads: int | None = None,
    calib_images: str | Path | None = None,
    calib_count: int = DEFAULT_CALIB_COUNT,
    calib_method: str = "percentile",
) -> OnnxManifest:
    """Copy the float32 export `onnx_dir` to `out` with `graphs` quantized (the per-frame ones calibrated on
    `calib_count` images of `calib_images`), measure agreement and (with `data`) accuracy against the float32
    export, write the manifest.

    Raises:
        InputError: bad arguments (unknown graph, `out` is `onnx_dir`, an already quantized source, per-frame
            graphs without calibration images).
        FileNotFoundError, ValueError, OSError: no usable calibration images (none found, fewer than one,
            an unreadable file).
        QuantizationError: accuracy drops beyond the limits (manifest.failed.json is written instead of
            manifest.json, so no runtime loads the folder).
    """
    import onnxruntime

    src, out = Path(onnx_dir), Path(out)
    manifest = OnnxManifest.load(src)
    unknown = sorted(set(graphs) - set(QUANTIZABLE))
    if unknown or not graphs:
        raise InputError(f"graphs to quantize must be some of {list(QUANTIZABLE)}, got {list(graphs)}")
    if manifest.quantization:
        raise InputError(
            f"{src} is already quantized ({sorted(manifest.quantization['graphs'])}); start from the float32 export"
        )
    if out.resolve() == src.resolve():
        raise InputError("--out must be another folder than --onnx-dir (the float32 export is the reference)")
    if data is not None and not Path(data).exists():
        raise InputError(f"--data {data}: no such file or folder")
    static = [stage for stage in graphs if QUANTIZABLE[stage].static]
    if static and calib_images is None:
        raise InputError(
            f"static INT8 of {static} needs --calib-images DIR: camera-like images, not the evaluation set "
            "(e.g. runs/default/data/train/shard-00000/images); or quantize the per-request graphs only: "
            f"--graphs {' '.join(PER_REQUEST_GRAPHS)}"
        )
    if calib_method not in CALIB_METHODS:
        raise InputError(f"calibration method must be one of {list(CALIB_METHODS)}, got {calib_method!r}")
    if static and calib_count < 1:
        raise InputError(f"--calib-count must be at least 1, got {calib_count}")
    feeds, calibration = {}, ""
    if static:  # before `out` is touched: unusable calibration images leave it as it was
        reference = OnnxRuntimeBackend.from_dir(src, providers=["cpu"], num_threads=num_threads)
        feeds, num_images = calibration_feeds(reference, Path(calib_images), calib_count, graphs)
        calibration = f"calibrated on {num_images} images of {calib_images} ({calib_method})"
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for stage in STAGES:
        name, how = manifest.graphs[stage].file, QUANTIZABLE.get(stage)
        if stage not in graphs:
            shutil.copyfile(src / name, out / name)
        elif how.static:
            log.info("quantizing %s (static, %s)", name, calibration)
            quantize_static_graph(
                src / name, out / name, feeds[stage], per_channel=how.per_channel, calib_method=calib_method
            )
        else:
            log.info("quantizing %s (dynamic)", name)
            quantize_dynamic_graph(src / name, out / name, per_channel=how.per_channel)
    shutil.copyfile(src / manifest.tokenizer, out / manifest.tokenizer)
    copy_sidecar(src, out)

    manifest.quantization = {
        "graphs": {stage: QUANTIZABLE[stage].describe(calibration) for stage in graphs},
        "onnxruntime": onnxruntime.__version__,
        "float32_source": str(src),
    }
    if static:
        manifest.quantization["calibration"] = {
            "images": str(calib_images),
            "count": num_images,
            "method": calib_method,
        }
    # The checks open the folder as the runtime does, so the manifest is written first; whatever stops them
    # moves it aside (manifest.failed.json), so a folder that was not checked never loads.
    manifest.save(out / MANIFEST_NAME)

    def refuse(reason: str) -> QuantizationError:
        return QuantizationError(f"{reason}; details in {manifest.set_aside(out)}")

    try:
        reference = OnnxRuntimeBackend.from_dir(src, providers=["cpu"], num_threads=num_threads)
        quantized = OnnxRuntimeBackend.from_dir(out, providers=["cpu"], num_threads=num_threads)
        tokenizer = QueryTokenizer.from_file(src / manifest.tokenizer)
        if data is None:
            requests = synthetic_requests(reference.config)
            source = "synthetic (export's test frame and queries)"
        else:
            requests, source = dataset_requests(Path(data), limit), str(data)
        agreement = measure_agreement(reference, quantized, tokenizer, requests, source=source)
        manifest.quantization["agreement"] = asdict(agreement)
        log.info("agreement with float32: %s", manifest.quantization["agreement"])
        accuracy = None
        if data is not None:
            accuracy = compare_accuracy(src, out, Path(data), limit, num_threads)
            accuracy["limits"] = {"max_giou_drop": max_giou_drop, "max_acc_drop": max_acc_drop}
            log.info("accuracy, float32 -> quantized: %s", accuracy)
    except Exception as exc:
        manifest.quantization["error"] = f"{type(exc).__name__}: {exc}"
        # ONNX Runtime's own exception types derive from Exception only: name them as what they are.
        if type(exc).__module__.startswith("onnxruntime"):
            raise refuse(f"ONNX Runtime cannot run the quantized {list(graphs)}: {exc}") from exc
        refuse(str(exc))  # moves the manifest aside; the original error (a bad sample, ...) says what to fix
        raise
    manifest.quantization["accuracy"] = accuracy
    if accuracy is None:
        log.warning("accuracy NOT checked (no --data): evaluate %s before deploying it", out)
    else:
        problems = accuracy_problems(accuracy["drop"], max_giou_drop, max_acc_drop)
        if problems:
            raise refuse(
                f"quantized {list(graphs)} lose too much on {data}: {'; '.join(problems)}{narrower_hint(graphs)}"
            )
    manifest.save(out / MANIFEST_NAME)
    return manifest


def narrower_hint(graphs: Sequence[str]) -> str:
    """What to try when quantizing `graphs` loses too much: the per-frame graphs alone, where most of a new
    frame's time goes, keep the per-request ones (text encoder, decoder) float32 and their errors out of every
    answer. Empty when only per-frame or only per-request graphs were quantized."""
    frame = [g for g in graphs if g not in PER_REQUEST_GRAPHS]
    if not frame or len(frame) == len(graphs):
        return ""
    return (
        f"; try --graphs {' '.join(frame)} (the per-frame graphs only: the text encoder and decoder stay "
        "float32, a new request costs a few ms more)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--onnx-dir", type=Path, required=True, help="float32 folder from export_onnx.py")
    parser.add_argument("--out", type=Path, required=True, help="output folder (a full, loadable export)")
    parser.add_argument(
        "--graphs",
        nargs="+",
        choices=list(QUANTIZABLE),
        default=list(DEFAULT_GRAPHS),
        help="graphs to quantize (default: all four; image_encoder and image_context need --calib-images)",
    )
    parser.add_argument(
        "--calib-images",
        type=Path,
        default=None,
        help="folder of camera-like images (searched recursively; .jpg .png ...) that calibrate the "
        "per-frame graphs' activation ranges; not the --data evaluation scenes",
    )
    parser.add_argument(
        "--calib-count",
        type=int,
        default=DEFAULT_CALIB_COUNT,
        help=f"calibration images used, a seeded choice spread over the folder (default: {DEFAULT_CALIB_COUNT})",
    )
    parser.add_argument(
        "--calib-method",
        choices=CALIB_METHODS,
        default="percentile",
        help="how activation ranges are chosen from the calibration activations: the 99.999th percentile "
        "of their histogram (ignores rare outliers; the better one on the default model) or min / max "
        "(default: percentile)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="held-out dataset with target masks (data engine folder, .jsonl, items.json, COCO .json): both "
        "exports are evaluated on it and accuracy drops are refused; default: no accuracy check, agreement "
        "on the export's synthetic test frame only",
    )
    parser.add_argument(
        "--limit", type=int, default=1000, help="requests evaluated and compared, with --data"
    )
    parser.add_argument(
        "--max-giou-drop",
        type=float,
        default=DEFAULT_MAX_GIOU_DROP,
        help="refuse when gIoU falls by more points than this against float32 (with --data)",
    )
    parser.add_argument(
        "--max-acc-drop",
        type=float,
        default=DEFAULT_MAX_ACC_DROP,
        help="refuse when N-acc or T-acc falls by more points than this (with --data)",
    )
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for the check")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("quantize_onnx", "training.evaluate"):  # not the quantizer's per-tensor chatter on the root
        logging.getLogger(name).setLevel(logging.INFO)
    if args.limit < 1:
        print("error: --limit must be at least 1", file=sys.stderr)
        return 2
    if importlib.util.find_spec("training") is None:
        print(
            "error: quantize_onnx measures the quantized graphs with the training package of a source checkout "
            "(training.metrics, training.evaluate), which is not on the path: run it from the repository root "
            "as `python -m export.quantize_onnx ...`",
            file=sys.stderr,
        )
        return 2
    try:
        manifest = quantize_export(
            args.onnx_dir,
            args.out,
            graphs=args.graphs,
            data=args.data,
            limit=args.limit,
            max_giou_drop=args.max_giou_drop,
            max_acc_drop=args.max_acc_drop,
            num_threads=args.threads,
            calib_images=args.calib_images,
            calib_count=args.calib_count,
            calib_method=args.calib_method,
        )
    # ValueError: the dataset readers, too few calibration images; OSError: missing or unreadable files.
    except (ConverSegError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    q = manifest.quantization
    print(f"quantized {list(args.graphs)} into {args.out}")
    print(f"agreement with float32: {q['agreement']}")
    print(f"accuracy: {q['accuracy'] if q['accuracy'] else 'NOT checked (no --data)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
