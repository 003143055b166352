"""Arc2Face projector: the fine-tuned CLIP-L text encoder with the ArcFace ID in token slot 4.

    ids  = "photo of a id person" padded to 77 (specs.PROMPT_IDS)
    tok  = encoder.token_embedding(ids)            # the fine-tuned encoder's own table
    tok[:, 4] = [id / ||id||, 0 x 256]             # no other scaling
    cond = final_layer_norm(encoder(tok + pos, causal mask only))   # [B, 77, 768]

Unlike the official wrapper this batches for B > 1 (the official code builds a mask that only
broadcasts for B = 1).
"""
from __future__ import annotations

import torch
from torch import nn

from arc2face_rt.specs import ID_DIM, ID_SLOT, PROMPT_IDS, TEXT_DIM, TEXT_LEN, UNCOND_IDS


def encode_token_embeddings(encoder, tok: torch.Tensor) -> torch.Tensor:
    """Run a transformers CLIPTextModel on token embeddings instead of ids.

    # tok: [B, 77, 768] -> last_hidden_state after final_layer_norm [B, 77, 768]
    Position embeddings are added by the encoder's own embedding module; the attention mask is the
    causal one only (Arc2Face passes no padding mask).
    """
    h = encoder.embeddings(inputs_embeds=tok)
    n = h.shape[1]
    causal = torch.full((n, n), float("-inf"), dtype=h.dtype).triu(1)[None, None]  # [1,1,n,n]
    h = encoder.encoder(inputs_embeds=h, attention_mask=causal).last_hidden_state
    return encoder.final_layer_norm(h)


class Arc2FaceProjector(nn.Module):
    """id [B, 512] (any norm) -> cond [B, 77, 768]."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        ids = torch.tensor([PROMPT_IDS], device=encoder.embeddings.token_embedding.weight.device)
        with torch.no_grad():
            # The prompt never changes, so its token embeddings are computed once ([77, 768]);
            # this also keeps the 49408x768 table out of the exported graph.
            tok = encoder.embeddings.token_embedding(ids)[0]
        self.register_buffer("prompt_tokens", tok.detach().clone(), persistent=False)

    def forward(self, id_emb: torch.Tensor, prompt_tokens: torch.Tensor | None = None) -> torch.Tensor:
        # id_emb: [B, 512]; prompt_tokens: [77, 768], default the table's rows cached at construction.
        # Training passes them live from the encoder's token table (frozen there: the rows are read, not trained).
        b = id_emb.shape[0]
        idn = id_emb / torch.linalg.vector_norm(id_emb, dim=1, keepdim=True)  # as the official code
        slot = torch.cat([idn, idn.new_zeros(b, TEXT_DIM - ID_DIM)], dim=1)[:, None]  # [B, 1, 768]
        tok = (self.prompt_tokens if prompt_tokens is None else prompt_tokens)[None].expand(b, TEXT_LEN, TEXT_DIM)
        tok = torch.cat([tok[:, :ID_SLOT], slot.to(tok.dtype), tok[:, ID_SLOT + 1:]], dim=1)
        return encode_token_embeddings(self.encoder, tok)


def prompt_token_embeddings(encoder) -> torch.Tensor:
    """The prompt's rows of the encoder's token table, differentiable. [77, 768]"""
    ids = torch.tensor(PROMPT_IDS, device=encoder.embeddings.token_embedding.weight.device)
    return encoder.embeddings.token_embedding(ids)


def encode_unconditional(encoder) -> torch.Tensor:
    """The negative embedding: the encoder on [BOS] + [EOS]*76 (not zeros), differentiable. [77, 768]"""
    ids = torch.tensor([UNCOND_IDS], device=encoder.embeddings.token_embedding.weight.device)
    return encoder(input_ids=ids).last_hidden_state[0]


@torch.no_grad()
def unconditional_embedding(encoder) -> torch.Tensor:
    """The constant negative embedding the runtime uses (see encode_unconditional). [77, 768]"""
    return encode_unconditional(encoder)
