"""The tiny world's text tokenizer: a byte-level BPE learnt from the grammar's prompts, laid out like OpenAI CLIP's.

Layout of the vocabulary (as in openai/clip-vit-large-patch14): the 256 byte symbols of GPT-2's reversible
byte->unicode table, the same 256 with the end-of-word marker ``</w>``, one token per learnt merge (in merge
order), then ``<|startoftext|>`` and ``<|endoftext|>``. The merges are learnt on ``grammar.all_prompts()`` (see
``learn_merges``); the result is wrapped as a ``transformers.CLIPTokenizer(vocab=..., merges=...)``, so
it is saved and loaded exactly like the real CLIP tokenizer. Every grammar word becomes one token, so every
prompt fits in ``MODEL_MAX_LENGTH`` = 16 tokens with the two specials. Training is deterministic.
"""
from __future__ import annotations

from collections import Counter

from .grammar import all_prompts

MODEL_MAX_LENGTH = 16
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


def _byte_order() -> list[int]:
    """Byte values in CLIP's vocabulary order: the printable ones first, then the rest."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return printable + [b for b in range(256) if b not in printable]


def byte_symbols() -> list[str]:
    """GPT-2/CLIP's 256 printable stand-ins for the bytes 0..255, in CLIP's vocabulary order."""
    order = _byte_order()
    return [chr(b) if i < 188 else chr(256 + i - 188) for i, b in enumerate(order)]


def learn_merges(texts: list[str], max_merges: int = 1000) -> list[tuple[str, str]]:
    """Byte-level BPE merges (in order), learnt greedily on word frequencies; words end in ``</w>``.

    Written here rather than taken from the ``tokenizers`` trainer: that trainer breaks ties between equally
    frequent pairs in hash/thread order, so two builds could learn different vocabularies. Here a tie goes to the
    lexicographically smallest pair, so a build is deterministic. The corpus is a few dozen word types, so the
    simple quadratic loop costs milliseconds.
    """
    table = dict(zip(_byte_order(), byte_symbols()))  # byte value -> its symbol
    freq = Counter(word for text in texts for word in text.split())
    words = {}
    for word in sorted(freq):
        symbols = [table[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        words[word] = symbols
    merges = []
    while len(merges) < max_merges:
        pairs = Counter()
        for word, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq[word]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in words.items():
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            words[word] = merged
    return merges


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
