"""What a dataset run makes (`DatasetSpec`, one field per `arc2face-rt dataset` flag that changes the
output) and how its work is cut into shards of identities.

`DIR/dataset.json` records the spec of the first run; `--resume` refuses to continue with another.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import InvalidInputError
from ..images import DEFAULT_JPEG_QUALITY, IMAGE_FORMATS
from ..pipeline import GenerationOptions

FORMATS = ("folders", "wds")
ON_REJECT = ("drop", "regenerate")


@dataclass(frozen=True)
class DatasetSpec:
    identities: int                    # N (--identities, or the rows of --identities-from)
    per_identity: int                  # K: images kept per identity (--per-identity)
    options: GenerationOptions         # --steps --guidance --scheduler --seed --batch
    format: str = "folders"            # --format: folders (DIR/id_000123/0007.png) | wds (tar shards)
    shard_size: int = 16               # --shard-size: identities per shard
    min_similarity: float | None = None   # --min-similarity: drop images whose ArcFace cosine is lower
    on_reject: str = "drop"            # --on-reject: drop | regenerate (with the next unused index)
    max_tries: int = 4                 # --max-tries: regenerate makes at most K * max_tries images per identity
    score: bool = False                # images are embedded and their similarity recorded (face models given)
    image_format: str = "png"          # --image-format: png | jpg
    jpeg_quality: int = DEFAULT_JPEG_QUALITY   # --jpeg-quality (jpg only)

    def check(self) -> None:
        self.options.check()
        if self.identities < 1 or self.per_identity < 1:
            raise InvalidInputError(f"--identities and --per-identity must be >= 1 (got {self.identities}, "
                                    f"{self.per_identity})")
        if self.shard_size < 1:
            raise InvalidInputError(f"--shard-size must be >= 1 (got {self.shard_size})")
        if self.format not in FORMATS:
            raise InvalidInputError(f"--format must be one of {', '.join(FORMATS)} (got {self.format!r})")
        if self.on_reject not in ON_REJECT:
            raise InvalidInputError(f"--on-reject must be one of {', '.join(ON_REJECT)} (got {self.on_reject!r})")
        if self.max_tries < 1:
            raise InvalidInputError(f"--max-tries must be >= 1 (got {self.max_tries})")
        if self.image_format not in IMAGE_FORMATS:
            raise InvalidInputError(f"--image-format must be one of {', '.join(IMAGE_FORMATS)} (got {self.image_format!r})")
        if not 1 <= self.jpeg_quality <= 100:
            raise InvalidInputError(f"--jpeg-quality must be in 1..100 (got {self.jpeg_quality})")
        if self.image_format != "jpg" and self.jpeg_quality != DEFAULT_JPEG_QUALITY:
            raise InvalidInputError("--jpeg-quality needs --image-format jpg (PNG is lossless)")
        if self.min_similarity is not None and not self.score:
            raise InvalidInputError("--min-similarity needs the face models: pass --models DIR (detector and "
                                    "arcface.onnx)")

    @property
    def shards(self) -> int:
        return math.ceil(self.identities / self.shard_size)

    def shard_identities(self, shard: int) -> range:
        """The identity numbers of `shard`: a fixed cut, so every worker makes the same shard."""
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.identities))

    def to_json(self) -> dict:
        """What dataset.json records (--batch included: on ONNX Runtime it can move a pixel by one grey
        level). PNG, the default, records no image fields, so datasets made before --image-format
        existed resume as they are."""
        d = asdict(self)
        if self.image_format == "png":
            del d["image_format"], d["jpeg_quality"]
        return d


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def identity_dir(j: int) -> str:
    return f"id_{j:06d}"


def image_key(j: int, index: int) -> str:
    """A sample's key in a WebDataset tar: `id_000123_0007` (folders name the file `id_000123/0007.png`)."""
    return f"{identity_dir(j)}_{index:04d}"
