"""Runtime backends behind one interface (see base.Backend). Imported lazily: the ONNX Runtime and
TensorRT backends must work in a process without torch."""

from __future__ import annotations

from pathlib import Path

from ..errors import BackendUnavailableError
from .base import Backend

BACKENDS = ("torch", "onnxruntime", "tensorrt")


def get_backend(name: str, path: str | Path, **kwargs) -> Backend:
    """torch: a ConverSeg checkpoint file; onnxruntime: a folder from export/export_onnx.py;
    tensorrt: a folder from export/build_trt.py."""
    if name == "torch":
        try:
            from .torch_backend import TorchBackend
        except ImportError as exc:
            raise BackendUnavailableError(
                f"the torch backend needs PyTorch ({exc}); install the project's [torch] extra, "
                "or use backend='onnxruntime' with an exported model folder"
            ) from exc
        return TorchBackend.from_checkpoint(path, **kwargs)
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend.from_dir(path, **kwargs)
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend.from_dir(path, **kwargs)
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")


__all__ = ["BACKENDS", "Backend", "get_backend"]
