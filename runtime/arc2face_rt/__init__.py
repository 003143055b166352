"""arc2face-rt: fast, dependable inference for Arc2Face (numpy, opencv, onnxruntime; TensorRT when present).

This package never imports torch, diffusers or transformers.
"""
__version__ = "0.1.0"
