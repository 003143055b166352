"""Writing ONNX graphs of any size: one protobuf caps at 2 GiB, so large graphs keep their weights in
`<file>.data` beside the graph (ONNX external data, one file)."""
from __future__ import annotations

from pathlib import Path

import onnx

EXTERNAL_DATA_BYTES = 1 << 30   # graphs whose weights exceed 1 GiB keep them in <file>.data


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write `model`, with its weights in `<path>.data` when they exceed `EXTERNAL_DATA_BYTES`."""
    if sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=Path(path).name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
