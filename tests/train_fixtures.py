"""Photos and a prepared data folder for the training tests (tiny random face models)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from face_fixtures import astronaut


def astronaut_variants(folder, n: int = 8):
    """n photos of the astronaut: flipped, rotated and resized variants (PNG and JPEG)."""
    img = astronaut()
    variants = [img, img[:, ::-1], np.rot90(img), np.rot90(img, 2), img[::2, ::2], img[64:448, 32:480],
                np.rot90(img[:, ::-1], 3), np.asarray(Image.fromarray(img).resize((384, 384)))]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, v in enumerate(variants[:n]):
        p = folder / f"photo{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(np.ascontiguousarray(v)).save(p)
        paths.append(p)
    return paths


def prepared_data(tmp_path, shard_size: int = 4):
    """A data folder of 8 samples (2 shards of 4)."""
    from arc2face_rt.face.identity import FaceAnalyzer
    from arc2face_rt.face.models import load_face_models
    from arc2face_ref.train.prepare import prepare

    from face_fixtures import tiny_models_dir

    astronaut_variants(tmp_path / "photos")
    rep = prepare([tmp_path / "photos"], tmp_path / "data",
                  lambda: FaceAnalyzer(*load_face_models(tiny_models_dir(), device="cpu")), shard_size=shard_size)
    assert rep.written == 8
    return tmp_path / "data"
