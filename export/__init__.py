"""Export and deployment tools: ONNX export with parity checks, TensorRT engine building, cross-backend
verification. Scripts here run as `python export/<script>.py`; see docs/EXPORT.md."""
