"""GPT-2's tokenizer files for a Hugging Face model directory, built offline from tiktoken's ranks.

A Hugging Face GPT-2 directory carries its BPE as `vocab.json` (byte-level token string -> id)
and `merges.txt` (the merge rules, highest priority first). tiktoken's r50k_base holds the same
tokenizer as a single table, token bytes -> rank, which `make setup` provisions offline
(ds_gpt.tokenizer). This module turns the one into the other:

  - vocab.json: each token's bytes, spelled through GPT-2's byte-to-unicode table (the
    printable stand-ins such as "Ġ" for a space), mapped to its rank, which is its id;
  - merges.txt: for each multi-byte token, in rank order, the pair of tokens it is merged from.
    That pair is what byte-pair encoding the token's own bytes with every lower rank yields:
    tiktoken merges the lowest-ranked adjacent pair first, so the last merge before a token
    appears joins exactly those two parts.

transformers' `TikTokenConverter` does a similar conversion but emits every split of a token
whose halves are tokens (not the one BPE makes), and only as a tokenizer.json for its generic
class; written here to give the 50,000 merges of GPT-2's own merges.txt, for GPT2Tokenizer.
Nothing here needs transformers: an export writes these files with the core requirements.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import tiktoken

from ds_gpt import tokenizer

EOT_TEXT = "<|endoftext|>"
MERGES_HEADER = "#version: 0.2"  # the first line of GPT-2's merges.txt, which readers skip
FILES = ("merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (openai/gpt-2 encoder.py): printable
    Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100 onwards, so no token
    string holds whitespace or control characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in table)
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def token_string(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """`token` byte-pair encoded with the merges of rank < max_rank only, as tiktoken does:
    repeatedly join the adjacent pair whose union has the lowest rank (the leftmost on a tie)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], max_rank)
            if rank < best_rank:
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


@functools.lru_cache(maxsize=2)  # ~1 s of pure Python for GPT-2; the result is only ever read
def vocab_and_merges(enc: tiktoken.Encoding) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json's mapping and merges.txt's pairs (in priority order) for a byte-level BPE
    encoding: the ids of `enc.encode_ordinary`, plus its special tokens."""
    specials = {text: enc.encode_single_token(text) for text in enc.special_tokens_set}
    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in specials.values()}
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[token_string(token)] = rank
        if len(token) == 1:
            continue
        parts = bpe_parts(ranks, token, rank)
        if len(parts) != 2:  # a rank table no BPE training produces; never true of GPT-2's
            raise ValueError(f"token {rank} ({token!r}) is not the merge of two lower-ranked tokens: {parts}")
        merges.append((token_string(parts[0]), token_string(parts[1])))
    vocab.update(specials)
    return vocab, merges


def tokenizer_config(model_max_length: int) -> dict:
    """tokenizer_config.json as transformers saves it for openai-community/gpt2: <|endoftext|>
    is bos, eos and unk; no prefix space; decoding keeps spaces exactly (no clean-up), so the
    text decoded is the text our tokenizer decodes."""
    eot = {"content": EOT_TEXT, "lstrip": False, "normalized": True, "rstrip": False,
           "single_word": False, "special": True}
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {str(tokenizer.EOT_TOKEN): eot},
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        "unk_token": EOT_TEXT,
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
    }


def write_gpt2_tokenizer(dest: Path, model_max_length: int, enc: tiktoken.Encoding | None = None) -> list[str]:
    """Write GPT-2's tokenizer files into the model directory `dest` (see FILES), so that
    `AutoTokenizer.from_pretrained(dest)` encodes exactly as ds_gpt.tokenizer.encode. Returns
    the names written. Raises ds_gpt.errors.UserError if the ranks are not provisioned."""
    enc = enc or tokenizer.get_encoding()
    vocab, merges = vocab_and_merges(enc)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = [MERGES_HEADER, *(f"{a} {b}" for a, b in merges)]
    (dest / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(model_max_length), indent=2) + "\n")
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    (dest / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return list(FILES)
