"""The real CLIP BPE tokenizer, built offline: OpenAI's vocabulary file as shipped inside the
open_clip_torch wheel, loaded into transformers' CLIPTokenizer (the tokenizer Arc2Face used)."""
from __future__ import annotations

import gzip
import importlib.util
import os


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP reversible byte -> printable unicode table (256 entries, CLIP's first vocab ids)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def clip_tokenizer():
    """transformers CLIPTokenizer with OpenAI's 49408-token vocabulary, or None if open_clip is absent."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]        # as CLIP's SimpleTokenizer reads the file
    units = _bytes_to_unicode()
    vocab = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[tuple(m.split()) for m in merges])
