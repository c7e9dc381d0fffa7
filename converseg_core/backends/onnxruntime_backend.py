"""ONNX Runtime backend: the four exported graphs, numpy in, numpy out, no torch.

An export folder (`python export/export_onnx.py`) holds:

    image_encoder.onnx   image (1 x 3 x S x S float32) -> image_embeddings (1 x 256 x S/16 x S/16),
                         hires_features (1 x 32 x S/4 x S/4)  (ImageFeatures)
    image_context.onnx   image_embeddings, hires_features -> image_tokens, fusion_keys, fusion_values,
                         dense_queries, hires_tokens: the decoder's per-frame part, run once per frame
                         (FrameContext)
    text_encoder.onnx    input_ids, attention_mask (Q x T int64) -> text_features (Q x T x 384)
    decoder.onnx         the FrameContext tensors, text_features, attention_mask -> low_res_logits
                         (Q x 1 x S/4 x S/4), iou_scores (Q x 1), presence_logits (Q): the per-request part
    manifest.json        model config, tensor names and shapes, opset, pre-processing constants, parity
                         and the sha256 of each file above and of the config, checked at load
    tokenizer.json       the MiniLM tokenizer, so the runtime needs no Python package for it

Execution providers: CPU always; CUDA and TensorRT when this onnxruntime build has them (onnxruntime-gpu,
the Jetson wheels). onnxruntime is imported only when a session is created, so the manifest reader here
also serves export/build_trt.py on machines without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converseg_core.backends.base import STAGES, GraphBackend, frame_io_problem
from converseg_core.config import ConverSegConfig, inference_default_problems
from converseg_core.errors import BackendUnavailableError, CheckpointError
from converseg_core.files import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "converseg-onnx-export"
# 2: the decoder split into image_context (per frame) and decoder (per request).
# 3: sha256 of every file the folder's model is made of, and of the config (checked at load).
MANIFEST_VERSION = 3
# Names of the only dynamic axes; every other dimension is fixed by the config.
QUERIES_AXIS = "num_queries"
TOKENS_AXIS = "num_tokens"

# Preference order: the first present wins for each node ORT can place on it.
PROVIDER_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


@dataclass
class TensorSpec:
    """One graph input or output: shape entries are ints or the name of a dynamic axis."""

    name: str
    shape: list[int | str]
    dtype: str


@dataclass
class GraphSpec:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass
class OnnxManifest:
    """What manifest.json holds. Written by export/export_onnx.py; read by this backend and build_trt.py."""

    config: dict[str, Any]
    opset: int
    graphs: dict[str, GraphSpec]
    preprocessing: dict[str, Any]
    tokenizer: str = "tokenizer.json"
    parity: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    # Empty for a float32 export; export/quantize_onnx.py records here the quantized graphs, the method, and
    # the agreement and accuracy it measured against the float32 export.
    quantization: dict[str, Any] = field(default_factory=dict)
    # Filled by save(): file name -> sha256 of each graph, its external weights and the tokenizer, and the
    # sha256 of `config`; load() refuses a folder that no longer matches them (docs/RELIABILITY.md).
    files: dict[str, str] = field(default_factory=dict)
    config_sha256: str = ""
    format: str = MANIFEST_FORMAT
    version: int = MANIFEST_VERSION

    @property
    def model_config(self) -> ConverSegConfig:
        return ConverSegConfig.from_dict(self.config)

    def model_files(self, directory: Path) -> list[str]:
        """The files the model is made of: each graph, its external weights when it has them, the tokenizer."""
        names = []
        for graph in self.graphs.values():
            names.append(graph.file)
            if (directory / f"{graph.file}.data").is_file():
                names.append(f"{graph.file}.data")
        return names + [self.tokenizer]

    def save(self, path: str | Path) -> None:
        """Write the manifest atomically, sealed with the sha256 of the model files now in its folder and of
        its config."""
        path = Path(path)
        self.files = {name: sha256_file(path.parent / name) for name in self.model_files(path.parent)}
        self.config_sha256 = config_sha256(self.config)
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> OnnxManifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise CheckpointError(
                f"ONNX manifest {path} not found; export the model with "
                "`python export/export_onnx.py --checkpoint CKPT --out DIR`"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(
                f"{path} is not a ConverSeg ONNX manifest (not valid JSON: {exc}); this backend opens the "
                "folder that `python export/export_onnx.py --checkpoint CKPT --out DIR` writes, not a "
                "PyTorch checkpoint"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise CheckpointError(f"{path} is not a ConverSeg ONNX manifest (format != {MANIFEST_FORMAT!r})")
        if data.get("version") != MANIFEST_VERSION:
            raise CheckpointError(
                f"{path} has manifest version {data.get('version')}, this code reads {MANIFEST_VERSION}; "
                "export again with this version of export/export_onnx.py"
            )
        try:
            data["graphs"] = {
                stage: GraphSpec(
                    file=g["file"],
                    inputs=[TensorSpec(**t) for t in g["inputs"]],
                    outputs=[TensorSpec(**t) for t in g["outputs"]],
                )
                for stage, g in data["graphs"].items()
            }
            manifest = cls(**data)
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"ONNX manifest {path} is incomplete or has unknown fields: {exc}") from exc
        missing = [s for s in STAGES if s not in manifest.graphs]
        if missing:
            raise CheckpointError(f"ONNX manifest {path} names no graph for {missing}")
        problem = frame_io_problem(
            manifest.graphs["image_context"].output_names,
            manifest.graphs["decoder"].input_names,
            manifest.graphs["image_encoder"].output_names,
        )
        if problem:
            raise CheckpointError(
                f"{path} was exported by another version of export/export_onnx.py ({problem}); export again"
            )
        check_sealed(manifest, path)
        return manifest


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of a config dict in canonical JSON (sorted keys, tuples as lists), as a manifest records it."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_sealed(manifest: OnnxManifest, path: Path) -> None:
    """Refuse a folder that is not what its manifest promises: a model file missing, unlisted or changed since
    export (sha256), a config edited by hand (config_sha256), or stored inference defaults that make no decision
    (converseg_core.config.inference_default_problems). Hashing reads each file once, at load."""
    again = "export again with export/export_onnx.py (or export/quantize_onnx.py)"
    if config_sha256(manifest.config) != manifest.config_sha256:
        raise CheckpointError(
            f"{path}: the config differs from the one the graphs were exported with (config_sha256 does not "
            f"match: edited after export?); {again}. To change presence_threshold, pass it at run time "
            "(--presence-threshold, Segmenter(presence_threshold=...)) or calibrate the checkpoint and export it"
        )
    problems = inference_default_problems(manifest.model_config)
    if problems:
        raise CheckpointError(f"{path}: {'; '.join(problems)}; {again} from a calibrated checkpoint")
    directory = path.parent
    unlisted = [name for name in manifest.model_files(directory) if name not in manifest.files]
    if unlisted:
        raise CheckpointError(f"{path} lists no sha256 for {unlisted}; {again}")
    for name, digest in manifest.files.items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; copy the whole export folder, or {again}")
        if sha256_file(file) != digest:
            raise CheckpointError(
                f"{file} does not match the sha256 in {path} (corrupted, truncated or replaced since export); "
                f"copy the folder again, or {again}"
            )


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
