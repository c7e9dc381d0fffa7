"""The on-disk artifacts between export and run time: the ONNX export folder and the TensorRT engine folder.

Written by export/ (export_onnx.py, quantize_onnx.py, build_trt.py), read by the runtime backends; both import
the formats from here and nowhere else. Nothing here imports torch, onnx, onnxruntime or TensorRT.

An ONNX export folder (`python export/export_onnx.py`) holds, with S = img_size, e = S/16, L = S/4 (low_res_size),
C = 256 (prompt_embed_dim), D = 384 (text_hidden_dim), g = concept_grid (e/2 with ImageNet concepts, else 1),
Q queries and T tokens (the only dynamic axes, QUERIES_AXIS and TOKENS_AXIS):

    image_encoder.onnx   image 1 x 3 x S x S -> image_embeddings 1 x C x e x e, hires_features 1 x C/8 x L x L,
                         concepts 1 x D x g x g (ImageFeatures)
    image_context.onnx   image_embeddings, hires_features, concepts -> image_tokens, fusion_keys, fusion_values,
                         dense_queries, hires_tokens, concept_tokens (FrameContext): the decoder's per-frame part
    text_encoder.onnx    input_ids, attention_mask Q x T int64 -> text_features Q x T x D
    decoder.onnx         image_tokens, fusion_keys, fusion_values, dense_queries, hires_tokens, concept_tokens,
                         text_features, attention_mask -> low_res_logits Q x 1 x L x L, iou_scores Q x 1,
                         presence_logits Q: the per-request part
    manifest.json        OnnxManifest: model config, every tensor's name and shape (graph_specs), opset,
                         pre-processing constants, parity, and the sha256 of each file and of the config
    tokenizer.json       the MiniLM tokenizer, so the runtime needs no Python package for it

graph_specs() is the exact list of names and shapes; the tables above are its summary.

A TensorRT engine folder (`python export/build_trt.py`, on the machine that runs it) holds one `<stage>.engine`
per stage, tokenizer.json (copied from the export), and engines.json (EngineSideFile: model config, TensorRT
version, GPU and compute capability, precision, optimization profiles, tensor names, engine sha256), which
the TensorRT backend checks before it deserializes any engine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .config import ConverSegConfig, inference_default_problems
from .errors import CheckpointError
from .files import atomic_write_text, sha256_file

# The exported graphs (and TensorRT engines), in the order a frame and a request flow through them.
STAGES = ("image_encoder", "image_context", "text_encoder", "decoder")

# The only dynamic axes of the graphs; every other dimension is fixed by the config, so TensorRT and ONNX
# Runtime plan the heavy image side for one shape.
QUERIES_AXIS = "num_queries"
TOKENS_AXIS = "num_tokens"

TOKENIZER_FILE_NAME = "tokenizer.json"

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "converseg-onnx-export"
# 2: the decoder split into image_context (per frame) and decoder (per request).
# 3: sha256 of every file the folder's model is made of, and of the config (checked at load).
MANIFEST_VERSION = 3
# The manifest of a folder that failed the exporter's checks: kept for the numbers, never loaded.
FAILED_MANIFEST_NAME = "manifest.failed.json"

SIDE_FILE_NAME = "engines.json"
SIDE_FILE_FORMAT = "converseg-tensorrt-engines"
# 2: engines for the four graphs of ONNX manifest version 2 (image_context split from the decoder).
SIDE_FILE_VERSION = 2
ENGINE_SUFFIX = ".engine"


class ImageFeatures(NamedTuple):
    """What the image encoder gives for B frames: torch tensors in the model (converseg_core.modeling), numpy
    arrays in the runtime backends. The field order is the image_encoder graph's outputs and the
    image_context graph's inputs.

    embedding: B x C x h x w, SAM's image embedding (h = img_size / 16);
    hires: B x C/8 x 4h x 4w, detail features the mask decoder adds to its upscaled features (encoders with a
        high-resolution path, modeling/efficientnet_lite.py); zeros for encoders without one (SAM, TinyViT,
        the StudentCNN), which leaves their masks exactly as SAM computes them;
    concepts: B x D x g x g, what the trunk's ImageNet classifier sees at each stride-32 place as a point in
        MiniLM's space (modeling/concepts.py; g = config.concept_grid); one all-zero place for encoders
        without one, which adds nothing to their masks.
    """

    embedding: Any
    hires: Any
    concepts: Any

    def select(self, index: Any) -> ImageFeatures:
        """The frames at `index` (Q): one frame per query, for batched training."""
        return ImageFeatures(self.embedding[index], self.hires[index], self.concepts[index])


class FrameContext(NamedTuple):
    """Everything the decoder needs from one frame, whatever the request: computed once per frame by
    `image_context`, reused for every request. Torch tensors in the model, numpy arrays in the runtime
    backends; B = 1 for a frame shared by all queries. Laid out as the per-request matmuls read it
    (d = C / heads), so no request transposes an image-sized tensor. The field names and order are the
    image_context graph's outputs and the decoder graph's first inputs.

    image_tokens: B x hw x C, the image embedding as tokens plus SAM's no-mask embedding (the mask decoder's
        input before the request's dense bias is added);
    fusion_keys: B x depth x heads x d x hw; fusion_values: B x depth x heads x hw x d;
    dense_queries: B x heads x hw x d;
    hires_tokens: B x 16hw x C/8, the encoder's detail features in the pixel order of the decoder's upscaled
        tokens (MaskDecoder.upscale_tokens);
    concept_tokens: B x g*g x D, ImageFeatures.concepts as tokens (row-major places).
    """

    image_tokens: Any
    fusion_keys: Any
    fusion_values: Any
    dense_queries: Any
    hires_tokens: Any
    concept_tokens: Any

    def select(self, index: Any) -> FrameContext:
        """The frames at `index` (Q): one frame per query, for batched training."""
        return FrameContext(*(field[index] for field in self))


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

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """tensor name -> {dimension: axis name} for every tensor with a dynamic axis (torch.onnx.export's
        `dynamic_axes`)."""
        axes = {}
        for tensor in self.inputs + self.outputs:
            named = {i: d for i, d in enumerate(tensor.shape) if isinstance(d, str)}
            if named:
                axes[tensor.name] = named
        return axes


def graph_specs(config: ConverSegConfig) -> dict[str, GraphSpec]:
    """The name, shape and dtype of every input and output of the graphs (STAGES) of this config; strings are
    the dynamic axes."""
    s, e, low = config.img_size, config.embed_size, config.low_res_size
    c, d = config.prompt_embed_dim, config.text_hidden_dim
    depth, heads, hw = config.fusion_depth, config.fusion_heads, config.embed_size**2
    g = config.concept_grid
    q, t = QUERIES_AXIS, TOKENS_AXIS
    features = [
        TensorSpec("image_embeddings", [1, c, e, e], "float32"),
        TensorSpec("hires_features", [1, c // 8, low, low], "float32"),
        TensorSpec("concepts", [1, d, g, g], "float32"),
    ]
    frame = [
        TensorSpec("image_tokens", [1, hw, c], "float32"),
        TensorSpec("fusion_keys", [1, depth, heads, c // heads, hw], "float32"),
        TensorSpec("fusion_values", [1, depth, heads, hw, c // heads], "float32"),
        TensorSpec("dense_queries", [1, heads, hw, c // heads], "float32"),
        TensorSpec("hires_tokens", [1, low * low, c // 8], "float32"),
        TensorSpec("concept_tokens", [1, g * g, d], "float32"),
    ]
    text = [TensorSpec("input_ids", [q, t], "int64"), TensorSpec("attention_mask", [q, t], "int64")]
    text_features = TensorSpec("text_features", [q, t, d], "float32")
    return {
        "image_encoder": GraphSpec(
            file="image_encoder.onnx", inputs=[TensorSpec("image", [1, 3, s, s], "float32")], outputs=features
        ),
        "image_context": GraphSpec(file="image_context.onnx", inputs=features, outputs=frame),
        "text_encoder": GraphSpec(file="text_encoder.onnx", inputs=text, outputs=[text_features]),
        "decoder": GraphSpec(
            file="decoder.onnx",
            inputs=[*frame, text_features, text[1]],
            outputs=[
                TensorSpec("low_res_logits", [q, 1, low, low], "float32"),
                TensorSpec("iou_scores", [q, 1], "float32"),
                TensorSpec("presence_logits", [q], "float32"),
            ],
        ),
    }


def preprocessing_record(config: ConverSegConfig) -> dict[str, Any]:
    """The pre-processing a manifest records, so tools that read only the folder (build_trt.py's INT8
    calibration) prepare images exactly as the runtime does."""
    return {
        "img_size": config.img_size,
        "pixel_mean": list(config.pixel_mean),
        "pixel_std": list(config.pixel_std),
        "resize": "longest side to img_size, bilinear",
        "pad": "bottom-right with zeros after normalization",
        "layout": "RGB, 1 x 3 x S x S float32",
        "max_query_tokens": config.max_query_tokens,
        "low_res_size": config.low_res_size,
    }


def frame_io_problem(
    context_outputs: list[str], decoder_inputs: list[str], encoder_outputs: list[str] | None = None
) -> str | None:
    """Why graphs with these tensor names cannot serve this FrameContext, or None when they can. Catches an
    export or engine folder written by another version of the code, before any tensor is fed."""
    fields = list(FrameContext._fields)
    if encoder_outputs is not None and len(encoder_outputs) != len(ImageFeatures._fields):
        return (
            f"image_encoder outputs {encoder_outputs}, this runtime expects {len(ImageFeatures._fields)} "
            f"({', '.join(ImageFeatures._fields)}): re-export the model with this version"
        )
    if context_outputs != fields:
        return f"image_context outputs {context_outputs}, this runtime expects {fields}"
    if decoder_inputs[: len(fields)] != fields:
        return f"decoder inputs {decoder_inputs}, this runtime expects {fields} first"
    return None


def config_sha256(config: dict[str, Any]) -> str:
    """sha256 of a config dict in canonical JSON (sorted keys, tuples as lists), as a manifest records it."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_json(path: Path, what: str, how_to_make: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{what} {path} not found; {how_to_make}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"{path} is not a ConverSeg {what} (not valid JSON: {exc}); {how_to_make}"
        ) from exc
    return data


@dataclass
class OnnxManifest:
    """What manifest.json holds. Written by export/export_onnx.py (and quantize_onnx.py); read by the ONNX
    Runtime backend and build_trt.py."""

    config: dict[str, Any]
    opset: int
    graphs: dict[str, GraphSpec]
    preprocessing: dict[str, Any]
    tokenizer: str = TOKENIZER_FILE_NAME
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

    def set_aside(self, directory: Path) -> Path:
        """Mark the folder as failed: this manifest goes to FAILED_MANIFEST_NAME and MANIFEST_NAME is removed,
        so no runtime loads graphs that did not pass their checks. Returns the failed manifest's path."""
        failed = directory / FAILED_MANIFEST_NAME
        self.save(failed)
        (directory / MANIFEST_NAME).unlink(missing_ok=True)
        return failed

    @classmethod
    def load(cls, path: str | Path) -> OnnxManifest:
        """Read and check a manifest (or the manifest of a folder): format, version, the graphs' tensor names
        against FrameContext, and the seal (check_sealed)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        data = _read_json(
            path,
            "ONNX manifest",
            "this backend opens the folder that `python export/export_onnx.py --checkpoint CKPT --out DIR` "
            "writes, not a PyTorch checkpoint",
        )
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


class EngineMismatchError(CheckpointError):
    """Engines built for another TensorRT version or GPU than the one running now."""


@dataclass
class EngineSideFile:
    """What `engines.json` holds; written by export/build_trt.py, checked before any engine is loaded.

    config: ConverSegConfig.to_dict() of the exported model.
    tensorrt_version: trt.__version__ at build time, e.g. "10.3.0.30".
    gpu_name / compute_capability: the build GPU, e.g. "Orin" / "8.7".
    precision: "fp32", "fp16" or "int8" (int8: image encoder INT8 with FP16 fallback, the rest FP16).
    build_date: ISO 8601, UTC.
    engines: stage -> {"file": name, "sha256": hex, "precision": str}.
    profiles: stage -> input name -> [min, opt, max] shapes.
    io: stage -> {"inputs": [...], "outputs": [...]} tensor names, as in the ONNX manifest.
    """

    config: dict[str, Any]
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    build_date: str
    engines: dict[str, dict[str, str]]
    profiles: dict[str, dict[str, list[list[int]]]] = field(default_factory=dict)
    io: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    tokenizer: str = TOKENIZER_FILE_NAME
    format: str = SIDE_FILE_FORMAT
    version: int = SIDE_FILE_VERSION

    @property
    def model_config(self) -> ConverSegConfig:
        return ConverSegConfig.from_dict(self.config)

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EngineSideFile:
        path = Path(path)
        data = _read_json(
            path,
            "TensorRT side-file",
            "build the engines with `python export/build_trt.py --onnx-dir ONNX_DIR --out DIR`",
        )
        if not isinstance(data, dict) or data.get("format") != SIDE_FILE_FORMAT:
            raise CheckpointError(
                f"{path} is not a ConverSeg TensorRT side-file (format != {SIDE_FILE_FORMAT!r})"
            )
        if data.get("version") != SIDE_FILE_VERSION:
            raise CheckpointError(
                f"{path} has side-file version {data.get('version')}, this code reads {SIDE_FILE_VERSION}; "
                "rebuild the engines with this version of export/build_trt.py"
            )
        try:
            side_file = cls(**data)
        except TypeError as exc:
            raise CheckpointError(
                f"TensorRT side-file {path} is incomplete or has unknown fields: {exc}"
            ) from exc
        try:
            problems = inference_default_problems(side_file.model_config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"TensorRT side-file {path} holds an invalid model config: {exc}") from exc
        if problems:  # engines.json is plain JSON: a hand edit must not pass (docs/RELIABILITY.md)
            raise CheckpointError(
                f"{path}: {'; '.join(problems)}; pass another threshold at run time, or build the engines "
                "again from an export of a calibrated checkpoint"
            )
        io = side_file.io
        if "image_context" in io and "decoder" in io:
            problem = frame_io_problem(
                io["image_context"]["outputs"],
                io["decoder"]["inputs"],
                io.get("image_encoder", {}).get("outputs"),
            )
            if problem:
                raise CheckpointError(
                    f"{path}: engines built from an export of another version ({problem}); export and "
                    "build again with this version of export/export_onnx.py and export/build_trt.py"
                )
        return side_file

    def check_engine_files(self, directory: Path, *, verify_checksums: bool = True) -> None:
        """Every stage has an engine file in `directory` with the sha256 recorded at build time."""
        for stage in STAGES:
            entry = self.engines.get(stage)
            if entry is None:
                raise CheckpointError(f"{directory / SIDE_FILE_NAME} names no {stage} engine")
            engine_path = directory / entry["file"]
            if not engine_path.is_file():
                raise CheckpointError(f"TensorRT engine {engine_path} is missing")
            if verify_checksums and sha256_file(engine_path) != entry["sha256"]:
                raise CheckpointError(
                    f"{engine_path} does not match its side-file checksum: the engine was rebuilt or replaced "
                    "without its engines.json; rebuild the whole folder with export/build_trt.py"
                )

    def check_compatible(self, *, tensorrt_version: str, gpu_name: str, compute_capability: str) -> None:
        """Raise EngineMismatchError unless these engines were built with this TensorRT on this GPU model.

        TensorRT engines are not portable across TensorRT versions (any part of the version: serialized
        plans embed the exact library build) nor across GPU models (kernels are chosen and tuned per SM
        and per device); both are compared exactly.
        """
        problems = []
        if tensorrt_version != self.tensorrt_version:
            problems.append(f"TensorRT {self.tensorrt_version} at build time, {tensorrt_version} here")
        if compute_capability != self.compute_capability:
            problems.append(
                f"GPU compute capability {self.compute_capability} at build time, {compute_capability} here"
            )
        if gpu_name != self.gpu_name:
            problems.append(f"GPU {self.gpu_name!r} at build time, {gpu_name!r} here")
        if problems:
            raise EngineMismatchError(
                "refusing to load TensorRT engines built for another setup: "
                + "; ".join(problems)
                + ". Rebuild them on this machine: `python export/build_trt.py --onnx-dir ONNX_DIR --out DIR "
                + f"--precision {self.precision}`"
            )
