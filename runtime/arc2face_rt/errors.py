"""One exception type per failure a user can act on; each message names the fix."""


class Arc2FaceError(Exception):
    """Base class for every error arc2face-rt raises on purpose."""


class MissingWeightsError(Arc2FaceError):
    """A weight or config file of the model folder is missing, truncated or unreadable."""


class EngineMismatchError(Arc2FaceError):
    """An engines folder was built by another spec revision, library, GPU or precision, or its files changed."""


class InvalidInputError(Arc2FaceError):
    """A user input (embedding file, option value, output path) is unusable."""


class OutputExistsError(Arc2FaceError):
    """An output file already exists; arc2face-rt never overwrites silently."""


class OutputWriteError(Arc2FaceError):
    """An output could not be written (full disk, permissions); what was finished is kept."""


class BackendUnavailableError(Arc2FaceError):
    """The requested backend (TensorRT, CUDA) cannot run on this machine."""


class ImageDecodeError(Arc2FaceError):
    """An image file is empty, truncated, too large, of an unsupported format, or not an image."""


class NoFaceError(Arc2FaceError):
    """No face (of the required score and size) was found in an image."""


class ModelFormatError(Arc2FaceError):
    """A model file (face detector, recognizer) does not have the inputs/outputs its role needs."""


class BuildFailedError(Arc2FaceError):
    """TensorRT refused to build a plan with the options given (batch profile, workspace, target)."""


def first_line(e: BaseException) -> str:
    """The first line of a library's error (at most 300 characters), or its type's name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def raise_if_out_of_memory(e: BaseException, doing: str) -> None:
    """ONNX Runtime and OpenVINO report a failed allocation as a generic runtime error ("Failed to
    allocate memory", "Failed to allocate 134217728 bytes", bad_alloc): make it the MemoryError it is,
    so the user is told to lower --batch or free memory."""
    text = str(e).lower()
    if isinstance(e, MemoryError) or "failed to allocate" in text or "bad_alloc" in text \
            or "out of memory" in text:
        said = next((line.strip()[:300] for line in str(e).splitlines() if "allocate" in line.lower()), None)
        raise MemoryError(f"{doing}: {said or first_line(e)}") from e
