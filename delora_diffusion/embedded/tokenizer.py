"""A CLIP byte-level BPE tokenizer built from the world's vocabulary, with no download.

Every world word and every rare token (``sks``...) is one token; any other text still tokenizes, byte by byte,
because all 256 byte symbols are in the vocabulary, as in CLIP's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from .world import vocabulary

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode symbols."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges by rank, as CLIP's BPE does."""
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        a, b = symbols[i], symbols[i + 1]
        merged, j = [], 0
        while j < len(symbols):
            if j + 1 < len(symbols) and symbols[j] == a and symbols[j + 1] == b:
                merged.append(a + b)
                j += 2
            else:
                merged.append(symbols[j])
                j += 1
        symbols = merged
    return symbols


def build_vocab_and_merges(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A vocabulary and merge list in which each word of ``words`` (default: the world's) is a single token."""
    words = vocabulary() if words is None else words
    byte_syms = list(_bytes_to_unicode().values())
    tokens = byte_syms + [s + "</w>" for s in byte_syms]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while True:
            parts = _bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
            if len(parts) == 1:
                break
            pair = (parts[0], parts[1])  # merge the first pair; repeat until the word is one token
            ranks[pair] = len(merges)
            merges.append(pair)
            tokens.append(pair[0] + pair[1])
    tokens = list(dict.fromkeys(tokens)) + [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(out_dir: str | Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` (CLIP's format) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    return out


def make_tokenizer(out_dir: str | Path, model_max_length: int = 20):
    """Write the files and load them as a ``CLIPTokenizer`` (save it with ``save_pretrained`` afterwards)."""
    from transformers import CLIPTokenizer

    out = write_tokenizer_files(out_dir)
    return CLIPTokenizer.from_pretrained(str(out), model_max_length=model_max_length)
