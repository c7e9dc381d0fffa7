"""Export and deployment tools: ONNX export with parity checks, TensorRT engine building, cross-backend
verification, INT8 quantization for the CPU (docs/EXPORT.md).

Installed as `converseg_export` (pyproject.toml maps this folder onto that name, so site-packages gets no
package called `export`); the modules import each other by that name. From a checkout, after the editable
install, each tool runs as `python export/<tool>.py`; where the project is installed without a checkout (the
robot image), `python -m converseg_export.<tool>`. quantize_onnx evaluates with training/, which is never
installed: it runs from the repository root as `python -m export.quantize_onnx`.
"""
