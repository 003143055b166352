"""Opening the face models, and reading an ONNX file's first nodes without the `onnx` package.

The runtime does not depend on `onnx`, but the recognizer's input convention is decided (as
insightface does) from the names of the graph's first nodes, so we read just those from the
protobuf wire format: ModelProto.graph is field 7, GraphProto.node field 1, NodeProto.name field 3,
NodeProto.op_type field 4 (onnx.proto). The file is memory-mapped and initializers are skipped over,
so this costs microseconds even for a 250 MB IResNet-100.
"""
from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

from .. import checks
from ..errors import EngineMismatchError, MissingWeightsError, ModelFormatError
from ..exits import os_error_reason
from ..folder_setup import DEVICES


def open_session(path: str | Path, what: str, fix: str, device: str = "auto", threads: int | None = None,
                 backend: str = "ort"):
    """A session for a face model (ONNX Runtime, or OpenVINO in f32 with backend "openvino"), with
    errors that say which model and how to get it."""
    checks.choice(device, "device (--device)", DEVICES)
    checks.choice(backend, "backend", ("ort", "openvino"))
    path = checks.path(path, f"the {what}'s file")
    try:
        st = os.stat(path)
        if stat.S_ISREG(st.st_mode):            # the kind first: only a regular file is opened to test it
            os.close(os.open(path, os.O_RDONLY))
    except FileNotFoundError:
        raise MissingWeightsError(f"{path}: {what} not found; {fix}") from None
    except (OSError, ValueError) as e:
        raise MissingWeightsError(f"{path}: cannot read the {what}: {os_error_reason(e)}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe, socket or device)"
        raise MissingWeightsError(f"{path}: is {kind}, not the {what} (an .onnx file); {fix}")
    try:
        if backend == "openvino":
            from ..backends.openvino import open_model_file
            return open_model_file(path)
        from ..backends import OrtSession
        return OrtSession(path, device=device, threads=threads)
    except EngineMismatchError as e:  # its message suggests re-exporting, which is wrong for these files
        raise MissingWeightsError(f"{path}: {what} is not a loadable ONNX file ({e.__cause__ or e}); "
                                  f"the download may be truncated: {fix}") from e


def static_input_shape(session, name: str) -> tuple | None:
    """The declared shape of input `name` (ints, or None for symbolic axes) if the session exposes it."""
    inputs = getattr(session, "inputs", None)  # OrtSession: {name: NodeArg}; other backends may lack it
    arg = inputs.get(name) if isinstance(inputs, dict) else None
    shape = getattr(arg, "shape", None)
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf, start: int, end: int):
    """Yield (field number, wire type, start, end) of each field of the message in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos)
        elif wire == 1:
            nxt = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            nxt = pos + length
        elif wire == 5:
            nxt = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if nxt > end:
            raise ValueError("field runs past the end of its message")
        yield field, wire, pos, nxt
        pos = nxt


def first_nodes(path: str | Path, count: int = 8) -> list[tuple[str, str]]:
    """(name, op_type) of the first `count` nodes of an ONNX graph, in file order (= graph.node order)."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            for field, wire, a, b in _fields(buf, 0, len(buf)):
                if field != 7 or wire != 2:          # ModelProto.graph
                    continue
                nodes = []
                for gfield, gwire, ga, gb in _fields(buf, a, b):
                    if gfield != 1 or gwire != 2:    # GraphProto.node
                        continue
                    name = op_type = ""
                    for nfield, nwire, na, nb in _fields(buf, ga, gb):
                        if nwire == 2 and nfield == 3:
                            name = bytes(buf[na:nb]).decode("utf-8", "replace")
                        elif nwire == 2 and nfield == 4:
                            op_type = bytes(buf[na:nb]).decode("utf-8", "replace")
                    nodes.append((name, op_type))
                    if len(nodes) == count:
                        break
                return nodes
    except (ValueError, IndexError, OSError) as e:
        raise ModelFormatError(f"{path}: not a readable ONNX model ({e}); re-download it") from e
    raise ModelFormatError(f"{path}: ONNX file has no graph; re-download it")
