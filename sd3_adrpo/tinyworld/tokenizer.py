"""The tiny world's text tokenizer: a byte-level BPE learnt from the grammar's prompts, laid out like OpenAI CLIP's.

Layout of the vocabulary (as in openai/clip-vit-large-patch14): the 256 byte symbols of GPT-2's reversible
byte->unicode table, the same 256 with the end-of-word marker ``</w>``, one token per learnt merge (in merge
order), then ``<|startoftext|>`` and ``<|endoftext|>``. The merges are learnt with the ``tokenizers`` library on
``grammar.all_prompts()``; the result is wrapped as a ``transformers.CLIPTokenizer(vocab=..., merges=...)``, so
it is saved and loaded exactly like the real CLIP tokenizer. Every grammar word becomes one token, so every
prompt fits in ``MODEL_MAX_LENGTH`` = 16 tokens with the two specials. Training is deterministic.
"""
from __future__ import annotations

import json

from .grammar import all_prompts

MODEL_MAX_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's 256 printable stand-ins for the bytes 0..255, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(extra))]


def learn_merges(texts: list[str], max_merges: int = 1000) -> list[tuple[str, str]]:
    """BPE merges (in order) learnt by the ``tokenizers`` trainer, words ending in ``</w>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    symbols = byte_symbols()
    tok = Tokenizer(models.BPE(end_of_word_suffix=END_OF_WORD))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(vocab_size=2 * len(symbols) + max_merges, min_frequency=1, show_progress=False,
                                  initial_alphabet=symbols, end_of_word_suffix=END_OF_WORD, special_tokens=[])
    tok.train_from_iterator(sorted(set(texts)), trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def build_tokenizer(texts: list[str] | None = None, model_max_length: int = MODEL_MAX_LENGTH):
    """A ``transformers.CLIPTokenizer`` whose BPE is learnt on ``texts`` (default: every grammar prompt)."""
    from transformers import CLIPTokenizer

    texts = all_prompts() if texts is None else texts
    if any(not t.isascii() for t in texts):
        raise ValueError("the tiny-world tokenizer is learnt on ASCII prompts only")
    merges = learn_merges(texts)
    symbols = byte_symbols()
    tokens = symbols + [s + END_OF_WORD for s in symbols]
    seen = set(tokens)
    kept = []
    for a, b in merges:
        if a + b not in seen:  # a merge whose result already exists would give a duplicate id
            tokens.append(a + b)
            seen.add(a + b)
            kept.append((a, b))
    tokens += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=kept, model_max_length=model_max_length)
    tokenizer.model_max_length = model_max_length
    check_tokenizer(tokenizer, texts)
    return tokenizer


def check_tokenizer(tokenizer, texts: list[str] | None = None) -> int:
    """Raise ValueError unless every text tokenizes without unknowns, within model_max_length, and round-trips.
    Returns the longest tokenized length (specials included)."""
    texts = all_prompts() if texts is None else texts
    longest = 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids[1:-1]:
            raise ValueError(f"{text!r} tokenizes with unknown tokens: {tokenizer.convert_ids_to_tokens(ids)}")
        if len(ids) > tokenizer.model_max_length:
            raise ValueError(f"{text!r} needs {len(ids)} tokens, more than {tokenizer.model_max_length}")
        if tokenizer.decode(ids, skip_special_tokens=True).strip() != text:
            raise ValueError(f"{text!r} does not round-trip: {tokenizer.decode(ids, skip_special_tokens=True)!r}")
        longest = max(longest, len(ids))
    return longest
