"""Backends run one exported stage each. Every backend session exposes the same small surface:

    sess.input_names, sess.output_names
    sess.run({name: np.ndarray}) -> {name: np.ndarray}     # synchronous, host arrays in and out
    sess.close()  (also a context manager)

ONNX Runtime (`ort`) is the backend every machine can use (the `cpu` or `gpu` extra, or JetPack's
onnxruntime); TensorRT (`trt`) needs a GPU, TensorRT and cuda-python;
OpenVINO (`openvino`, CPU) needs `pip install 'arc2face-rt[openvino]'` and is imported only when used.
"""
from .ort import OrtSession, ort_providers

__all__ = ["OrtSession", "ort_providers"]
