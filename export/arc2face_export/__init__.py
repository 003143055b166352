"""arc2face-export: PyTorch reference -> ONNX (fp32/fp16) -> TensorRT engines, with validation and manifests."""
