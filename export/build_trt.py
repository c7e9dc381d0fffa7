"""Build TensorRT engines from an ONNX export folder, on the machine that will run them.

    python export/build_trt.py --onnx-dir out/onnx_edge --out out/trt_edge --precision fp16
    python export/build_trt.py --onnx-dir out/onnx_edge --out out/trt_edge --precision int8 \\
        --calib-images data/calib --profile num_queries=1,1,4

Builds image_encoder.engine, image_context.engine, text_encoder.engine and decoder.engine with the TensorRT
Python API (8.6 as in
JetPack 6.0, 10.x as in JetPack 6.1/6.2 and current NGC containers), then writes engines.json (model config,
TensorRT version, GPU and compute capability, precision, build date, profiles, checksums) that
TensorRTBackend checks before loading. Engines are not portable: build them on the target (docs/EXPORT.md).

Precision: fp32 and fp16 apply to all four engines. int8 quantizes the image encoder (entropy calibration
on real images, FP16 where INT8 has no kernel or loses) and keeps the image context, text encoder and decoder
in FP16: they take a small share of the frame time, and their attention softmaxes and token features
calibrate poorly from images alone.
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from converseg_core.anchoring import copy_sidecar
from converseg_core.artifacts import (
    ENGINE_SUFFIX,
    MANIFEST_NAME,
    QUERIES_AXIS,
    SIDE_FILE_NAME,
    STAGES,
    TOKENS_AXIS,
    EngineSideFile,
    OnnxManifest,
)
from converseg_core.backends.tensorrt_backend import (
    check_cuda,
    cuda_device_info,
    import_cudart,
    import_tensorrt,
)
from converseg_core.errors import BackendUnavailableError, CheckpointError
from converseg_core.files import atomic_write_bytes, sha256_file
from converseg_core.processing import preprocess
from converseg_export.calibration import CalibrationBatcher, find_images, read_cache, write_cache

log = logging.getLogger("EngineBuilder")

PRECISIONS = ("fp32", "fp16", "int8")
EXIT_NO_TENSORRT = 3


def default_profiles(max_query_tokens: int) -> dict[str, tuple[int, int, int]]:
    """min, opt, max of each dynamic axis: one to a few queries at a time, typical queries of ~16 tokens."""
    return {QUERIES_AXIS: (1, 1, 8), TOKENS_AXIS: (1, 16, max_query_tokens)}


def parse_profile(text: str) -> tuple[str, tuple[int, int, int]]:
    """'num_tokens=1,16,32' -> ('num_tokens', (1, 16, 32)); argparse type for --profile."""
    name, sep, values = text.partition("=")
    try:
        low, opt, high = (int(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--profile {text!r}: expected NAME=MIN,OPT,MAX with integers"
        ) from None
    if not sep or name not in (QUERIES_AXIS, TOKENS_AXIS):
        raise argparse.ArgumentTypeError(f"--profile {text!r}: NAME must be {QUERIES_AXIS} or {TOKENS_AXIS}")
    if not 1 <= low <= opt <= high:
        raise argparse.ArgumentTypeError(f"--profile {text!r}: need 1 <= MIN <= OPT <= MAX")
    return name, (low, opt, high)


def make_entropy_calibrator(
    trt: Any, cudart: Any, batcher: CalibrationBatcher | None, cache_path: Path | None
):
    """An IInt8EntropyCalibrator2 that copies the batcher's numpy batches to the GPU.

    Defined in a function because the base class exists only where TensorRT is installed. Without a
    batcher it serves only the cache (TensorRT then never asks for a batch).
    """

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._batches = iter(batcher) if batcher is not None else None
            self._allocation = 0
            if batcher is not None:
                nbytes = 4 * math.prod(batcher.input_shape)
                self._allocation = int(check_cuda(cudart.cudaMalloc(nbytes)))

        def get_batch_size(self) -> int:
            return batcher.batch_size if batcher is not None else 1

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._batches is None:
                return None
            batch = next(self._batches, None)
            if batch is None:
                log.info("calibration: all %d batches used", batcher.num_batches)
                return None
            log.info("calibration batch %d / %d", batcher.batch_index + 1, batcher.num_batches)
            kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            check_cuda(cudart.cudaMemcpy(self._allocation, batch.ctypes.data, batch.nbytes, kind))
            return [self._allocation]

        def read_calibration_cache(self) -> bytes | None:
            return read_cache(cache_path)

        def write_calibration_cache(self, cache: Any) -> None:
            write_cache(cache_path, bytes(cache))

        def __del__(self) -> None:
            if self._allocation:
                cudart.cudaFree(self._allocation)

    return EntropyCalibrator()


class EngineBuilder:
    """Parses one ONNX graph and builds one serialized TensorRT engine; methods follow the build order:
    create_network -> set_profile -> set_precision -> create_engine."""

    def __init__(
        self, trt: Any, *, workspace_gb: float, timing_cache: Path | None, verbose: bool = False
    ) -> None:
        self.trt = trt
        self.logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.INFO)
        trt.init_libnvinfer_plugins(self.logger, "")
        self.builder = trt.Builder(self.logger)
        self.config = self.builder.create_builder_config()
        # max_workspace_size was removed in TensorRT 10; the memory-pool API exists since 8.4.
        self.config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        self.timing_cache_path = timing_cache
        cache_bytes = (
            timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
        )
        self.timing_cache = self.config.create_timing_cache(cache_bytes)
        # ignore_mismatch=False: a cache from another GPU or TensorRT is rejected instead of misleading tactics.
        self.config.set_timing_cache(self.timing_cache, False)
        self.network = None
        self.parser = None
        self.profile = None

    def create_network(self, onnx_path: Path) -> None:
        trt = self.trt
        flags = 0
        if int(trt.__version__.split(".")[0]) < 10:
            # Explicit batch is the only mode in TensorRT 10 (the flag is deprecated there); 8.x needs it.
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
        self.network = self.builder.create_network(flags)
        self.parser = trt.OnnxParser(self.network, self.logger)
        # parse_from_file resolves external-data files next to the graph; parse(bytes) does not.
        if not self.parser.parse_from_file(str(onnx_path)):
            errors = [str(self.parser.get_error(i)) for i in range(self.parser.num_errors)]
            raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors))
        for i in range(self.network.num_inputs):
            tensor = self.network.get_input(i)
            log.info("input %r shape %s dtype %s", tensor.name, tuple(tensor.shape), tensor.dtype)
        for i in range(self.network.num_outputs):
            tensor = self.network.get_output(i)
            log.info("output %r shape %s dtype %s", tensor.name, tuple(tensor.shape), tensor.dtype)

    def set_profile(
        self, shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]
    ) -> None:
        """shapes: input name -> (min, opt, max) for every network input with a dynamic dimension."""
        dynamic = [
            self.network.get_input(i).name
            for i in range(self.network.num_inputs)
            if -1 in tuple(self.network.get_input(i).shape)
        ]
        missing = sorted(set(dynamic) - set(shapes))
        if missing:
            raise ValueError(f"no optimization profile for dynamic inputs {missing}")
        if not dynamic:
            return
        self.profile = self.builder.create_optimization_profile()
        for name in dynamic:
            low, opt, high = shapes[name]
            self.profile.set_shape(name, low, opt, high)
            log.info("profile %r min %s opt %s max %s", name, low, opt, high)
        self.config.add_optimization_profile(self.profile)

    def set_precision(self, precision: str, calibrator: Any = None) -> None:
        trt = self.trt
        if precision in ("fp16", "int8"):
            if not getattr(self.builder, "platform_has_fast_fp16", True):
                log.warning("this GPU has no fast FP16; the engine will be slow")
            self.config.set_flag(trt.BuilderFlag.FP16)
        if precision == "int8":
            if not getattr(self.builder, "platform_has_fast_int8", True):
                log.warning("this GPU has no fast INT8; the engine will be slow")
            if calibrator is None:
                raise ValueError("int8 needs a calibrator (calibration images or a calibration cache)")
            self.config.set_flag(trt.BuilderFlag.INT8)
            self.config.int8_calibrator = calibrator
            if self.profile is not None:
                self.config.set_calibration_profile(self.profile)

    def create_engine(self, engine_path: Path) -> None:
        log.info("building %s (minutes on a Jetson)", engine_path)
        serialized = self.builder.build_serialized_network(self.network, self.config)
        if serialized is None:
            raise RuntimeError(f"TensorRT failed to build {engine_path.name}; see the TensorRT log above")
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(engine_path, bytes(serialized))
        if self.timing_cache_path is not None:
            atomic_write_bytes(self.timing_cache_path, bytes(self.config.get_timing_cache().serialize()))
        log.info("wrote %s (%.1f MB)", engine_path, engine_path.stat().st_size / 1e6)


def input_profiles(
    manifest: OnnxManifest, stage: str, axes: dict[str, tuple[int, int, int]]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes of each input of a graph with dynamic axes, from the manifest's axis names."""
    shapes = {}
    for spec in manifest.graphs[stage].inputs:
        if all(isinstance(d, int) for d in spec.shape):
            continue
        unknown = [d for d in spec.shape if isinstance(d, str) and d not in axes]
        if unknown:
            raise ValueError(f"{stage} input {spec.name!r} has dynamic axes {unknown} with no --profile")
        shapes[spec.name] = tuple(
            tuple(axes[d][k] if isinstance(d, str) else d for d in spec.shape) for k in range(3)
        )
    return shapes


def check_float_export(manifest: OnnxManifest, onnx_dir: Path) -> None:
    """TensorRT parses standard ONNX: the INT8 graphs of export/quantize_onnx.py use ONNX Runtime's integer
    ops (QLinearConv, QGemm, MatMulInteger, DynamicQuantizeLinear) and are refused with the way out."""
    if manifest.quantization:
        graphs = sorted(manifest.quantization.get("graphs", {}))
        source = manifest.quantization.get("float32_source", "the float32 export")
        raise ValueError(
            f"{onnx_dir} holds ONNX Runtime INT8 graphs ({', '.join(graphs)}) that TensorRT cannot build; "
            f"build from the float32 export ({source}) and use --precision int8 for TensorRT's own "
            "calibrated INT8"
        )


def calibration_preprocess(manifest: OnnxManifest):
    pre = manifest.preprocessing

    def run(image):
        return preprocess(
            image,
            img_size=pre["img_size"],
            pixel_mean=tuple(pre["pixel_mean"]),
            pixel_std=tuple(pre["pixel_std"]),
        ).tensor

    return run


def build_engines(
    onnx_dir: Path,
    out: Path,
    *,
    precision: str = "fp16",
    calib_images: Path | None = None,
    calib_cache: Path | None = None,
    calib_max_images: int = 512,
    workspace_gb: float = 2.0,
    profiles: dict[str, tuple[int, int, int]] | None = None,
    timing_cache: Path | None = None,
    device: int = 0,
    verbose: bool = False,
) -> EngineSideFile:
    """Build the engines (STAGES) of `onnx_dir` into `out` and write the side-file. Returns the side-file."""
    manifest = OnnxManifest.load(onnx_dir)
    check_float_export(manifest, onnx_dir)
    trt = import_tensorrt()
    cudart = import_cudart()
    check_cuda(cudart.cudaSetDevice(device))
    gpu_name, capability = cuda_device_info(device)
    log.info("TensorRT %s on %s (sm %s), precision %s", trt.__version__, gpu_name, capability, precision)
    axes = default_profiles(manifest.model_config.max_query_tokens)
    axes.update(profiles or {})
    out.mkdir(parents=True, exist_ok=True)
    timing_cache = timing_cache or out / "timing.cache"
    calib_cache = calib_cache or out / "calibration.cache"

    engines: dict[str, dict[str, str]] = {}
    stage_profiles: dict[str, dict[str, list[list[int]]]] = {}
    for stage in STAGES:
        graph = manifest.graphs[stage]
        stage_precision = precision if precision != "int8" or stage == "image_encoder" else "fp16"
        builder = EngineBuilder(trt, workspace_gb=workspace_gb, timing_cache=timing_cache, verbose=verbose)
        builder.create_network(onnx_dir / graph.file)
        shapes = input_profiles(manifest, stage, axes)
        builder.set_profile(shapes)
        calibrator = None
        if stage_precision == "int8":
            batcher = None
            if calib_images is not None:
                image_shape = [int(d) for d in graph.inputs[0].shape]
                batcher = CalibrationBatcher(
                    find_images(calib_images),
                    preprocess=calibration_preprocess(manifest),
                    input_shape=image_shape,
                    max_images=calib_max_images,
                )
                log.info("calibrating on %d images from %s", batcher.num_images, calib_images)
            elif not calib_cache.is_file():
                raise ValueError("int8 needs --calib-images or an existing --calib-cache")
            calibrator = make_entropy_calibrator(trt, cudart, batcher, calib_cache)
        builder.set_precision(stage_precision, calibrator)
        engine_path = out / f"{stage}{ENGINE_SUFFIX}"
        builder.create_engine(engine_path)
        engines[stage] = {
            "file": engine_path.name,
            "sha256": sha256_file(engine_path),
            "precision": stage_precision,
        }
        stage_profiles[stage] = {name: [list(s) for s in mmm] for name, mmm in shapes.items()}

    shutil.copyfile(onnx_dir / manifest.tokenizer, out / manifest.tokenizer)
    copy_sidecar(onnx_dir, out)
    side_file = EngineSideFile(
        config=manifest.config,
        tensorrt_version=trt.__version__,
        gpu_name=gpu_name,
        compute_capability=capability,
        precision=precision,
        build_date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        engines=engines,
        profiles=stage_profiles,
        io={
            s: {"inputs": manifest.graphs[s].input_names, "outputs": manifest.graphs[s].output_names}
            for s in STAGES
        },
        tokenizer=manifest.tokenizer,
    )
    side_file.save(out / SIDE_FILE_NAME)
    log.info("wrote %s", out / SIDE_FILE_NAME)
    return side_file


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--onnx-dir", type=Path, required=True, help=f"folder from export_onnx.py (with {MANIFEST_NAME})"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the engines and engines.json")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp16", help="engine precision (default: fp16)"
    )
    parser.add_argument(
        "--calib-images", type=Path, default=None, help="folder of real images for INT8 calibration"
    )
    parser.add_argument(
        "--calib-cache",
        type=Path,
        default=None,
        help="INT8 calibration cache, read if present (default: OUT/calibration.cache)",
    )
    parser.add_argument(
        "--calib-max-images", type=int, default=512, help="images used for calibration at most"
    )
    parser.add_argument(
        "--workspace", type=float, default=2.0, help="builder workspace limit in GB (default: 2)"
    )
    parser.add_argument(
        "--profile",
        type=parse_profile,
        action="append",
        default=[],
        metavar="NAME=MIN,OPT,MAX",
        help=f"optimization profile of a dynamic axis ({QUERIES_AXIS}, default 1,1,8; {TOKENS_AXIS}, default "
        "1,16,max_query_tokens); repeatable",
    )
    parser.add_argument(
        "--timing-cache", type=Path, default=None, help="timing cache file (default: OUT/timing.cache)"
    )
    parser.add_argument("--device", type=int, default=0, help="CUDA device index")
    parser.add_argument("--verbose", action="store_true", help="TensorRT verbose log")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    calib_cache = args.calib_cache or args.out / "calibration.cache"
    if args.precision == "int8" and args.calib_images is None and not calib_cache.is_file():
        print(
            f"error: --precision int8 needs --calib-images DIR or an existing calibration cache ({calib_cache})",
            file=sys.stderr,
        )
        return 2
    if (args.onnx_dir / MANIFEST_NAME).is_file():  # refused here too, so the message does not need TensorRT
        try:
            check_float_export(OnnxManifest.load(args.onnx_dir), args.onnx_dir)
        except (CheckpointError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        import_tensorrt()
        import_cudart()
    except BackendUnavailableError as exc:
        print(f"error: build_trt.py cannot run here: {exc}", file=sys.stderr)
        return EXIT_NO_TENSORRT
    try:
        build_engines(
            args.onnx_dir,
            args.out,
            precision=args.precision,
            calib_images=args.calib_images,
            calib_cache=calib_cache,
            calib_max_images=args.calib_max_images,
            workspace_gb=args.workspace,
            profiles=dict(args.profile),
            timing_cache=args.timing_cache,
            device=args.device,
            verbose=args.verbose,
        )
    except (CheckpointError, ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
