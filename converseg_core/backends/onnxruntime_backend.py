"""ONNX Runtime backend: the four exported graphs, numpy in, numpy out, no torch.

Opens an export folder (`python export/export_onnx.py`; its layout and manifest.json are defined in
converseg_core.artifacts) after OnnxManifest.load has checked its format, tensor names and sha256 seal.

Execution providers: CPU always; CUDA and TensorRT when this onnxruntime build has them (onnxruntime-gpu,
the Jetson wheels). onnxruntime is imported only when a session is created.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from converseg_core.artifacts import STAGES, OnnxManifest
from converseg_core.backends.base import GraphBackend
from converseg_core.errors import BackendUnavailableError, CheckpointError

log = logging.getLogger(__name__)

# Preference order: the first present wins for each node ORT can place on it.
PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def available_providers() -> list[str]:
    """Execution providers of the installed onnxruntime, by our short names (tensorrt, cuda, cpu)."""
    ort = _import_onnxruntime()
    present = set(ort.get_available_providers())
    return [short for short, full in PROVIDER_NAMES.items() if full in present]


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailableError(
            f"onnxruntime is not installed ({exc}): `pip install onnxruntime` (CPU), `onnxruntime-gpu` (CUDA), "
            "or the Jetson wheel matching your JetPack"
        ) from exc
    return ort


class OnnxRuntimeBackend(GraphBackend):
    """The Backend interface of docs/ARCHITECTURE.md on ONNX Runtime sessions."""

    name = "onnxruntime"

    def __init__(self, *, manifest: OnnxManifest, sessions: dict[str, Any], directory: Path) -> None:
        self.manifest = manifest
        self.config = manifest.model_config
        self.directory = directory
        self.tokenizer_path = directory / manifest.tokenizer
        self._sessions = sessions
        self.providers = sessions["image_encoder"].get_providers()

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        *,
        providers: list[str] | tuple[str, ...] | None = None,
        num_threads: int | None = None,
        trt_cache_dir: str | Path | None = None,
        trt_fp16: bool = True,
        allow_spinning: bool = False,
    ) -> OnnxRuntimeBackend:
        """Open the graphs (STAGES) of an export folder.

        providers: short names in preference order, from ("tensorrt", "cuda", "cpu"). None: every one
            this onnxruntime build has, TensorRT first. Asking for one that is absent is an error, not a
            silent fall-back to the CPU.
        num_threads: intra-op threads (None: ONNX Runtime's default, one per physical core).
        allow_spinning: let each session's idle worker threads busy-wait for work (ONNX Runtime's default).
            Off here: a frame runs three graphs and a request two, back to back, and one session's spinning
            workers take the cores from the next session's. On 2 cores, `bench/bench_ort_threads.py`:
            new frame 114-124 ms and text + decoder 73-79 ms spinning, 43-46 and 26-27 ms not; one
            process-wide pool (ONNX Runtime's global thread pool) measured the same as no spinning, and
            would force every other ONNX Runtime session of the process onto it, so it is not used.
        trt_cache_dir: where ORT's TensorRT provider keeps the engines it builds (the first run builds them,
            minutes on a Jetson); default `<path>/ort_trt_cache`.
        """
        ort = _import_onnxruntime()
        directory = Path(path)
        manifest = OnnxManifest.load(directory)
        present = available_providers()
        if providers is None:
            providers = present
        unknown = [p for p in providers if p not in PROVIDER_NAMES]
        if unknown:
            raise ValueError(f"unknown execution providers {unknown}; choose from {list(PROVIDER_NAMES)}")
        absent = [p for p in providers if p not in present]
        if absent:
            raise BackendUnavailableError(
                f"execution providers {absent} are not in this onnxruntime build (it has {present}); install "
                "onnxruntime-gpu (CUDA, TensorRT) or the Jetson onnxruntime wheel"
            )
        provider_list: list[Any] = []
        for short in providers:
            if short == "tensorrt":
                cache = Path(trt_cache_dir) if trt_cache_dir else directory / "ort_trt_cache"
                options = {
                    "trt_fp16_enable": trt_fp16,
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True,
                }
                provider_list.append((PROVIDER_NAMES[short], options))
            else:
                provider_list.append(PROVIDER_NAMES[short])
        if "cpu" not in providers:
            # Nodes the GPU providers cannot take (shape ops) still need a home.
            provider_list.append(PROVIDER_NAMES["cpu"])

        sessions = {}
        for stage in STAGES:
            graph_path = directory / manifest.graphs[stage].file
            if not graph_path.is_file():
                raise CheckpointError(f"ONNX graph {graph_path} is missing")
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if num_threads is not None:
                options.intra_op_num_threads = num_threads
            if not allow_spinning:
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                sessions[stage] = ort.InferenceSession(str(graph_path), options, providers=provider_list)
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
                raise CheckpointError(f"ONNX Runtime could not load {graph_path}: {exc}") from exc
        return cls(manifest=manifest, sessions=sessions, directory=directory)

    def _run(self, stage: str, *arrays: np.ndarray) -> list[np.ndarray]:
        graph = self.manifest.graphs[stage]
        feeds = {
            spec.name: np.ascontiguousarray(a, dtype=spec.dtype)
            for spec, a in zip(graph.inputs, arrays, strict=True)
        }
        return self._sessions[stage].run(graph.output_names, feeds)
