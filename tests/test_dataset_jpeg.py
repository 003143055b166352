"""`dataset --image-format jpg`: the same samples as the PNG run, stored as JPEG (the generated pixels
compressed once, the parameters in the JPEG comment), in folders and in WebDataset tars that the
`webdataset` package reads back; PNG datasets record no image fields, so older ones still resume."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from arc2face_rt.cli import main as rt_main
from arc2face_rt.dataset.spec import DatasetSpec
from arc2face_rt.pipeline import GenerationOptions
from dataset_runs import K, N, dataset_args


def _tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def _jpeg(pixels: np.ndarray, params: dict, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality, comment=json.dumps(params, sort_keys=True).encode())
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_wds(tiny_engines, tmp_path_factory):
    out = tmp_path_factory.mktemp("jpeg") / "wds"
    assert rt_main(dataset_args(tiny_engines, out, "--format", "wds", "--image-format", "jpg", "--jpeg-quality",
                                "90")) == 0
    return out


def test_jpeg_tars_hold_the_png_runs_pixels_compressed_once(jpeg_wds, wds_run):
    shards = sorted(p.name for p in wds_run.glob("shard-*.tar"))
    assert shards == sorted(p.name for p in jpeg_wds.glob("shard-*.tar")) and shards
    for name in shards:
        png, jpg = _tar_members(wds_run / name), _tar_members(jpeg_wds / name)
        keys = sorted(k[:-4] for k in png if k.endswith(".png"))
        assert sorted(k[:-4] for k in jpg if k.endswith(".jpg")) == keys and keys
        for key in keys:
            sample = json.loads(jpg[f"{key}.json"])
            assert sample == json.loads(png[f"{key}.json"]) and jpg[f"{key}.cls"] == png[f"{key}.cls"]
            pixels = np.asarray(Image.open(io.BytesIO(png[f"{key}.png"])).convert("RGB"))
            assert jpg[f"{key}.jpg"] == _jpeg(pixels, sample["params"], 90)
            im = Image.open(io.BytesIO(jpg[f"{key}.jpg"]))
            assert (im.format, im.size, im.mode) == ("JPEG", (512, 512), "RGB")
            assert json.loads(im.info["comment"]) == sample["params"]


def test_jpeg_tars_read_back_with_webdataset(jpeg_wds):
    wds = pytest.importorskip("webdataset")
    tars = sorted(str(p) for p in jpeg_wds.glob("shard-*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("rgb8"))
    assert len(samples) == N * K
    for s in samples:
        assert s["jpg"].shape == (512, 512, 3) and s["jpg"].dtype == np.uint8
        assert int(s["cls"]) == s["json"]["identity"]


def test_jpeg_folders_and_a_resume_with_another_format_is_refused(tiny_engines, scored_run, tmp_path, capsys):
    out = tmp_path / "folders"
    assert rt_main(dataset_args(tiny_engines, out, "--image-format", "jpg", n=2)) == 0
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg"))
    assert files == [f"id_{j:06d}/{i:04d}.jpg" for j in range(2) for i in range(K)]
    assert not list(out.rglob("*.png"))
    png = np.asarray(Image.open(scored_run / "id_000001" / "0001.png").convert("RGB"))   # same seed: same pixels
    got = (out / "id_000001" / "0001.jpg").read_bytes()
    assert got == _jpeg(png, json.loads(Image.open(io.BytesIO(got)).info["comment"]), 95)
    spec = json.loads((out / "dataset.json").read_text())["spec"]
    assert (spec["image_format"], spec["jpeg_quality"]) == ("jpg", 95)
    capsys.readouterr()
    assert rt_main(dataset_args(tiny_engines, out, "--resume", n=2)) == 2
    err = capsys.readouterr().err
    assert "(spec.image_format: 'jpg' there, 'png' now);" in err and "jpeg_quality" not in err


def test_settings_that_took_no_effect_do_not_stop_a_resume(tiny_engines, tmp_path):
    """Older versions accepted and recorded --on-reject/--max-tries without --min-similarity; this one
    refuses those flags, so such a dataset must resume without them."""
    out = tmp_path / "d"
    assert rt_main(dataset_args(tiny_engines, out, n=1, k=1)) == 0
    meta = json.loads((out / "dataset.json").read_text())
    meta["spec"].update(on_reject="regenerate", max_tries=8)
    (out / "dataset.json").write_text(json.dumps(meta))
    assert rt_main(dataset_args(tiny_engines, out, "--resume", n=1, k=1)) == 0


def test_jpeg_quality_without_jpg_is_refused_before_anything_is_written(tiny_engines, tmp_path, capsys):
    assert rt_main(dataset_args(tiny_engines, tmp_path / "o", "--jpeg-quality", "80")) == 2
    assert "--jpeg-quality 80 needs --image-format jpg" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_png_spec_records_what_it_recorded_before_image_formats():
    """dataset.json of a PNG run keeps the keys it had before --image-format, so those datasets resume."""
    spec = DatasetSpec(identities=2, per_identity=1, options=GenerationOptions())
    assert set(spec.to_json()) == {"identities", "per_identity", "options", "format", "shard_size",
                                   "min_similarity", "on_reject", "max_tries", "score"}
    jpg = DatasetSpec(identities=2, per_identity=1, options=GenerationOptions(), image_format="jpg", jpeg_quality=80)
    assert (jpg.to_json()["image_format"], jpg.to_json()["jpeg_quality"]) == ("jpg", 80)


def test_dataset_pngs_keep_the_zlib_level_of_earlier_versions():
    """A re-made shard is compared byte for byte with what an earlier run left; generate's PNGs moved to
    level 4, a dataset's stay at Pillow's default, so a dataset from before still resumes."""
    from PIL.PngImagePlugin import PngInfo

    from arc2face_rt.images import PARAMS_KEY, image_bytes, png_bytes

    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    info = PngInfo()
    info.add_text(PARAMS_KEY, json.dumps({"seed": 1}, sort_keys=True))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", pnginfo=info)          # Pillow's default level
    assert image_bytes(pixels, {"seed": 1}, "png") == buf.getvalue()
    assert png_bytes(pixels, {"seed": 1}) != buf.getvalue()                # generate's level 4
