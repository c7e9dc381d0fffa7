"""TensorRT backend: four serialized engines plus a side-file, numpy in, numpy out, no torch.

Opens an engine folder (`python export/build_trt.py`; its layout and engines.json are defined in
converseg_core.artifacts). A serialized engine is only valid for the TensorRT version and the GPU it was
built with; TensorRT itself says so late and cryptically (or not at all across GPUs of one family), so
`TensorRTBackend.from_dir` compares the side-file with the running TensorRT and GPU first and refuses with a
message that names both and the command that rebuilds the engines.

TensorRT and cuda-python are imported only when engines are loaded; their absence raises
BackendUnavailableError with the install step. Everything that does not touch the GPU (the side-file, the
compatibility check) lives in converseg_core.artifacts and is tested on machines that have neither.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from converseg_core.artifacts import SIDE_FILE_NAME, STAGES, EngineMismatchError, EngineSideFile
from converseg_core.backends.base import GraphBackend
from converseg_core.errors import BackendUnavailableError, InputError

log = logging.getLogger(__name__)

TENSORRT_HINT = (
    "TensorRT runs on the target: a Jetson with JetPack 6 (TensorRT 8.6 in JetPack 6.0, 10.3 in 6.1/6.2; "
    "`sudo apt install nvidia-jetpack` provides python3-libnvinfer) or, on x86 with an NVIDIA GPU, an NGC "
    "TensorRT container (nvcr.io/nvidia/tensorrt:<yy.mm>-py3). See docs/EXPORT.md."
)
CUDA_PYTHON_HINT = (
    "the TensorRT backend moves tensors with cuda-python: `pip install 'cuda-python>=12,<13'` matching the "
    "CUDA 12 of JetPack 6 / the NGC container"
)


def import_tensorrt() -> Any:
    """The `tensorrt` module, or BackendUnavailableError saying where it runs."""
    try:
        import tensorrt as trt
    except ImportError as exc:  # also OSError-derived failures of a half-installed libnvinfer surface here
        raise BackendUnavailableError(
            f"TensorRT is not installed here (import tensorrt: {exc}). {TENSORRT_HINT}"
        ) from exc
    if not hasattr(trt, "Builder"):
        # The PyPI `tensorrt` meta-package without its libraries imports but is empty.
        raise BackendUnavailableError(
            f"the installed `tensorrt` package has no TensorRT libraries. {TENSORRT_HINT}"
        )
    return trt


def import_cudart() -> Any:
    """cuda-python's runtime module (new `cuda.bindings` layout first, then the pre-12.6 `cuda.cudart`)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise BackendUnavailableError(
                f"cuda-python is not installed ({exc}); {CUDA_PYTHON_HINT}"
            ) from exc
    return cudart


def check_cuda(result: Any) -> Any:
    """Unwrap a cuda-python call's `(err, *values)` tuple; raise on any error code."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def cuda_device_info(device: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of a CUDA device, through cuda-python."""
    cudart = import_cudart()
    props = check_cuda(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return name.rstrip("\x00").strip(), f"{props.major}.{props.minor}"


class _DeviceBuffer:
    """A device allocation that grows when a larger tensor comes (dynamic Q and T) and never shrinks."""

    def __init__(self, cudart: Any) -> None:
        self._cudart = cudart
        self.ptr = 0
        self.nbytes = 0

    def ensure(self, nbytes: int) -> int:
        if nbytes > self.nbytes:
            self.free()
            self.ptr = int(check_cuda(self._cudart.cudaMalloc(max(nbytes, 1))))
            self.nbytes = nbytes
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            check_cuda(self._cudart.cudaFree(self.ptr))
            self.ptr = 0
            self.nbytes = 0


class TrtEngine:
    """One deserialized engine with its execution context; runs numpy inputs to numpy outputs.

    Uses the name-based tensor API (`set_input_shape`, `set_tensor_address`, `execute_async_v3`), which
    TensorRT 8.5+ and 10.x both have; the binding-index API was removed in 10.0.
    """

    def __init__(self, trt: Any, cudart: Any, runtime: Any, path: Path, stream: Any) -> None:
        self._trt = trt
        self._cudart = cudart
        self._stream = stream
        self.path = path
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineMismatchError(
                f"TensorRT could not deserialize {path} (see the TensorRT log above); rebuild it on this "
                "machine with export/build_trt.py"
            )
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(
                f"TensorRT could not create an execution context for {path} (out of GPU memory?)"
            )
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._buffers = {n: _DeviceBuffer(cudart) for n in names}

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cudart, stream = self._cudart, self._stream
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host_inputs = []
        for name in self.inputs:
            # TensorRT 8.6 turns ONNX int64 inputs into int32 tensors; 10.x keeps int64: follow the engine.
            array = np.ascontiguousarray(feeds[name], dtype=self._dtypes[name])
            host_inputs.append(array)  # keeps the host memory alive until the copy is done
            if not self.context.set_input_shape(name, tuple(array.shape)):
                raise InputError(
                    f"{self.path.name}: input {name!r} shape {array.shape} is outside the engine's "
                    "optimization profile (see the side-file's `profiles`); rebuild with a wider --profile"
                )
            ptr = self._buffers[name].ensure(array.nbytes)
            check_cuda(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, h2d, stream))
            self.context.set_tensor_address(name, ptr)
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = np.empty(shape, dtype=self._dtypes[name])
            self.context.set_tensor_address(name, self._buffers[name].ensure(results[name].nbytes))
        if not self.context.execute_async_v3(stream):
            raise RuntimeError(f"TensorRT execution of {self.path.name} failed (see the TensorRT log)")
        for name, array in results.items():
            check_cuda(
                cudart.cudaMemcpyAsync(array.ctypes.data, self._buffers[name].ptr, array.nbytes, d2h, stream)
            )
        check_cuda(cudart.cudaStreamSynchronize(stream))
        del host_inputs
        return results

    def close(self) -> None:
        for buffer in self._buffers.values():
            buffer.free()


def query_limits(profiles: dict[str, dict[str, list[list[int]]]]) -> dict[str, int]:
    """stage -> the most queries its engine admits: the smallest max of dimension 0 (the queries axis) over
    the dynamic inputs of the text encoder and the decoder (their only dynamic axes are queries and tokens)."""
    limits = {}
    for stage in ("text_encoder", "decoder"):
        maxima = [int(min_opt_max[2][0]) for min_opt_max in profiles.get(stage, {}).values()]
        if maxima:
            limits[stage] = min(maxima)
    return limits


class TensorRTBackend(GraphBackend):
    """The Backend interface of docs/ARCHITECTURE.md on TensorRT engines (Jetson / NGC container)."""

    name = "tensorrt"

    def __init__(self, *, side_file: EngineSideFile, engines: dict[str, TrtEngine], directory: Path) -> None:
        self.side_file = side_file
        self.config = side_file.model_config
        self.directory = directory
        self.tokenizer_path = directory / side_file.tokenizer
        self._engines = engines
        self._io = side_file.io
        self.query_limits = query_limits(side_file.profiles)

    @classmethod
    def from_dir(cls, path: str | Path, *, device: int = 0, verify_checksums: bool = True) -> TensorRTBackend:
        """Load the engines of `path` after checking the side-file against this TensorRT and GPU.

        Raises:
            CheckpointError: side-file or engine missing or corrupted.
            EngineMismatchError: engines built with another TensorRT version or for another GPU.
            BackendUnavailableError: TensorRT or cuda-python not installed.
        """
        directory = Path(path)
        side_file = EngineSideFile.load(directory / SIDE_FILE_NAME)
        side_file.check_engine_files(directory, verify_checksums=verify_checksums)
        trt = import_tensorrt()
        cudart = import_cudart()
        check_cuda(cudart.cudaSetDevice(device))
        gpu_name, capability = cuda_device_info(device)
        side_file.check_compatible(
            tensorrt_version=trt.__version__, gpu_name=gpu_name, compute_capability=capability
        )
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        runtime = trt.Runtime(logger)
        stream = check_cuda(cudart.cudaStreamCreate())
        started = time.perf_counter()
        engines = {
            stage: TrtEngine(trt, cudart, runtime, directory / side_file.engines[stage]["file"], stream)
            for stage in STAGES
        }
        log.info(
            "loaded %s TensorRT engines from %s in %.1f s",
            side_file.precision,
            directory,
            time.perf_counter() - started,
        )
        return cls(side_file=side_file, engines=engines, directory=directory)

    def _run(self, stage: str, *arrays: np.ndarray) -> list[np.ndarray]:
        io = self._io[stage]
        outputs = self._engines[stage](dict(zip(io["inputs"], arrays, strict=True)))
        return [outputs[name].astype(np.float32, copy=False) for name in io["outputs"]]

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
