"""The PyTorch reference: projector semantics against transformers' own forward, loading errors."""
from __future__ import annotations

import shutil

import pytest
import torch

from arc2face_rt.errors import MissingWeightsError
from arc2face_rt.specs import ID_SLOT, PROMPT_IDS, UNCOND_IDS
from arc2face_ref.loading import load_models, model_files
from arc2face_ref.projector import Arc2FaceProjector, unconditional_embedding


def test_prompt_ids_match_the_real_clip_tokenizer():
    """Oracle: transformers' CLIPTokenizer with OpenAI's own BPE vocabulary (tests/clip_vocab.py)."""
    from clip_vocab import clip_tokenizer

    tok = clip_tokenizer()
    if tok is None:
        pytest.skip("open_clip_torch (the CLIP vocabulary file) is not installed; .ci/run installs it")
    assert tuple(tok("photo of a id person", padding="max_length", max_length=77).input_ids) == PROMPT_IDS
    assert tuple(tok("", padding="max_length", max_length=77).input_ids) == UNCOND_IDS
    assert tok.convert_ids_to_tokens(PROMPT_IDS[ID_SLOT]) == "id</w>"


def test_prompt_constants():
    assert len(PROMPT_IDS) == len(UNCOND_IDS) == 77
    assert PROMPT_IDS[ID_SLOT] == 1014
    assert PROMPT_IDS[:7] == (49406, 1125, 539, 320, 1014, 2533, 49407)


@torch.no_grad()
def test_projector_equals_encoder_forward_with_id_token(tiny_models):
    """Oracle: transformers' own CLIPTextModel.forward on the prompt ids, with the token-embedding
    output patched at slot 4 (what the official wrapper does), for each identity separately."""
    enc = tiny_models.encoder
    proj = Arc2FaceProjector(enc)
    ids = torch.randn(3, 512, generator=torch.Generator().manual_seed(0)) * 7.0
    got = proj(ids)
    for i in range(3):
        slot = torch.cat([ids[i] / ids[i].norm(), torch.zeros(256)])

        def hook(_m, _inp, out, slot=slot):
            out = out.clone()
            out[:, ID_SLOT] = slot
            return out

        h = enc.embeddings.token_embedding.register_forward_hook(hook)
        try:
            want = enc(input_ids=torch.tensor([PROMPT_IDS])).last_hidden_state[0]
        finally:
            h.remove()
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-5)
    # the norm of the input does not matter; identities differ
    torch.testing.assert_close(proj(ids * 0.01), got, rtol=1e-5, atol=1e-5)
    assert (got[0] - got[1]).abs().max() > 1e-3


@torch.no_grad()
def test_uncond_is_encoder_on_empty_prompt(tiny_models):
    enc = tiny_models.encoder
    u = unconditional_embedding(enc)
    assert u.shape == (77, 768)
    want = enc(input_ids=torch.tensor([UNCOND_IDS])).last_hidden_state[0]
    torch.testing.assert_close(u, want)
    assert u.abs().sum() > 0


def test_missing_files_are_named(tiny_model_dir, tmp_path):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (broken / "encoder" / "config.json").unlink()
    with pytest.raises(MissingWeightsError) as e:
        model_files(broken)
    assert "vae/diffusion_pytorch_model.safetensors" in str(e.value)
    assert "encoder/config.json" in str(e.value)
    with pytest.raises(MissingWeightsError, match="no such model folder"):
        model_files(tmp_path / "nowhere")


@pytest.mark.parametrize("victim", ["arc2face/diffusion_pytorch_model.safetensors", "encoder/pytorch_model.bin"])
def test_truncated_weights_are_reported(tiny_model_dir, tmp_path, victim):
    broken = tmp_path / "m"
    shutil.copytree(tiny_model_dir, broken)
    p = broken / victim
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
    with pytest.raises(MissingWeightsError, match="truncated"):
        load_models(broken)


def test_random_checkpoint_is_seeded(tiny_model_dir, tmp_path):
    from arc2face_ref.random_ckpt import write_random_checkpoint
    from arc2face_rt.errors import OutputExistsError

    with pytest.raises(OutputExistsError):
        write_random_checkpoint(tiny_model_dir, size="tiny", face_models=False)
    again = write_random_checkpoint(tmp_path / "again", size="tiny", seed=0, face_models=False)
    a = (tiny_model_dir / "arc2face" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (again / "arc2face" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b
    assert (again / "RANDOM_WEIGHTS.txt").is_file()
    assert not list(tmp_path.glob(".again*"))   # no temporary folder left behind


def test_full_config_is_sd15():
    from arc2face_ref.random_ckpt import CONFIGS
    from diffusers import UNet2DConditionModel

    cfg = CONFIGS["full"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
    n = sum(p.numel() for p in unet.parameters())
    assert 859_000_000 < n < 860_000_000      # SD1.5 UNet: 859.52 M parameters
    assert cfg["encoder"]["num_hidden_layers"] == 12 and cfg["encoder"]["hidden_size"] == 768


def test_force_replaces_a_random_checkpoint_and_outputs_get_the_usual_modes(tiny_model_dir, tmp_path):
    import os
    import stat

    from arc2face_ref.random_ckpt import write_random_checkpoint

    c = tmp_path / "c"
    shutil.copytree(tiny_model_dir, c, copy_function=os.link)     # one this tool wrote
    old = os.umask(0o027)
    try:
        assert write_random_checkpoint(c, size="tiny", seed=1, force=True) == c
    finally:
        os.umask(old)
    assert "seed=1" in (c / "RANDOM_WEIGHTS.txt").read_text() and (c / "arcface.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["c"]           # neither the old one nor a temporary is left
    for p in [c, *c.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~0o027
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_loading_and_casting_print_no_library_warnings(tiny_model_dir, capfd):
    """diffusers 0.42 warns on every dtype cast of a model, even with no module kept in fp32; loading (fp32
    and fp16), the bf16 cast of fit's VAE and the fp16 export's casts print nothing."""
    from arc2face_ref.loading import cast, load_models

    capfd.readouterr()
    for dtype in (torch.float32, torch.float16):
        models = load_models(tiny_model_dir, dtype=dtype)
        assert next(models.unet.parameters()).dtype == dtype
    vae = cast(models.vae, torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    from arc2face_export.onnx_export import _modules_for        # the fp16 export's casts

    for stage in ("step_cfg", "vae_decoder"):
        _modules_for(load_models(tiny_model_dir), stage, "fp16")
    out, err = capfd.readouterr()
    assert "float32" not in out + err, out + err
