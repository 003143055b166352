"""Face front end: image files → SCRFD detection → 5-point alignment → ArcFace → unit 512-d identity.

numpy, OpenCV, Pillow and an inference library (ONNX Runtime, OpenVINO, or TensorRT plans of the face
models) only (insightface itself is not needed; its behaviour is
reproduced and cited where it matters). Model loading and photos -> identity live in
`face.models`, the `embed`/`score` commands in `face.cli`.
"""
from .align import ARCFACE_TEMPLATE, align_face, align_matrix, umeyama
from .detector import Face, ScrfdDetector, choose_face
from .identity import EmbedReport, FaceAnalyzer, FileResult, Identity, combine_embeddings, embed_images
from .image_io import DEFAULT_LIMITS, ImageLimits, decode_image, expand_paths, load_image
from .recognizer import ArcFaceRecognizer, l2_normalize

__all__ = [
    "ARCFACE_TEMPLATE", "align_face", "align_matrix", "umeyama",
    "Face", "ScrfdDetector", "choose_face",
    "EmbedReport", "FaceAnalyzer", "FileResult", "Identity", "combine_embeddings", "embed_images",
    "DEFAULT_LIMITS", "ImageLimits", "decode_image", "expand_paths", "load_image",
    "ArcFaceRecognizer", "l2_normalize",
]
