"""What text each token id stands for, whatever the tokenizer family.

Alignment compares tokens of different tokenizers, so every id is first turned into its
*surface*: the exact bytes it contributes to decoded text. The family is read from the fast
tokenizer's own pipeline (`backend_tokenizer.to_str()`: pre-tokenizer, decoder, model), not
from a list of model names, so any HF fast tokenizer works:

- byte-level BPE (GPT-2, Llama-3, SmolLM2, Qwen): every character of a piece is one byte
  through GPT-2's bytes-to-unicode table (`Ġ` = space, `Ċ` = newline, `Ã¯` = 0xC3 0xAF).
- SentencePiece / Metaspace (Llama-2, Mistral, Gemma, T5): the decoder's `Replace` or
  `Metaspace` step says which marker (`▁`) means a space; pieces are otherwise UTF-8 text;
  with byte fallback, `<0xNN>` is the single byte NN.
- WordPiece (BERT): the continuation prefix (`##`) is dropped; word-initial pieces get no
  space (the decoder's spacing is not a property of the token; approximate by nature).
- anything else: the piece as UTF-8 text.

Non-special *added* tokens (Gemma's `\\n\\n`, `<table>`) are literal text and are taken as is.
Special tokens (bos/eos/pad/unk/unused/control) have no surface (`None`): they are never
matched to ordinary text.

Surfaces are kept as `str` with one character per byte (latin-1), so that pieces holding part
of a UTF-8 character compare bytewise and both families share one alphabet; edit distances
are therefore counted in bytes. `strip_space` removes the space marker (now `" "`) as the DTW
cost of the reference does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

BYTE_LEVEL, METASPACE, WORDPIECE, PLAIN = "byte_level", "metaspace", "wordpiece", "plain"
SPECIAL_ROLES = ("bos", "eos", "unk", "pad")


@lru_cache(maxsize=1)
def byte_level_table() -> dict[str, int]:
    """GPT-2's unicode-character -> byte table: printable bytes stand for themselves, the
    other 68 are shifted to code points 256 and up, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + n): b for n, b in enumerate(shifted)})
    return table


@dataclass(frozen=True)
class Decoding:
    """How one tokenizer's pieces become bytes, read from its pipeline."""

    family: str
    replacements: tuple[tuple[str, str], ...] = ()  # literal (pattern, content), decoder order
    byte_fallback: bool = False  # `<0xNN>` pieces are raw bytes
    continuation: str = ""  # WordPiece prefix, e.g. "##"


def _walk(node: Any) -> list[dict]:
    """The steps of a pipeline node, flattening `Sequence` nodes."""
    if not isinstance(node, dict):
        return []
    inner = node.get("decoders") or node.get("pretokenizers") or node.get("normalizers")
    if node.get("type") == "Sequence" and isinstance(inner, list):
        return [step for child in inner for step in _walk(child)]
    return [node]


def _from_vocab(vocab: dict[str, int]) -> Decoding:
    """Guess the family from the pieces when the pipeline says nothing."""
    pieces = list(vocab)
    g = sum(p.startswith("Ġ") for p in pieces)
    s = sum(p.startswith("▁") for p in pieces)
    if g > max(s, len(pieces) // 100):
        return Decoding(BYTE_LEVEL)
    if s > len(pieces) // 100:
        fallback = sum(len(p) == 6 and p.startswith("<0x") and p.endswith(">") for p in pieces) >= 256
        return Decoding(METASPACE, (("▁", " "),), fallback)
    return Decoding(PLAIN)


def decoding_from_json(spec: dict) -> Decoding:
    """Decoding of a `tokenizer.json` document (the parsed `backend_tokenizer.to_str()`)."""
    decoder = _walk(spec.get("decoder"))
    pre = _walk(spec.get("pre_tokenizer"))
    model = spec.get("model") or {}
    types = {step.get("type") for step in decoder + pre}
    if "ByteLevel" in types:
        return Decoding(BYTE_LEVEL)
    replacements = []
    for step in decoder:
        if step.get("type") == "Metaspace":
            replacements.append((step.get("replacement", "▁"), " "))
        elif step.get("type") == "Replace" and "String" in (step.get("pattern") or {}):
            replacements.append((step["pattern"]["String"], step.get("content", "")))
    fallback = "ByteFallback" in types or bool(model.get("byte_fallback"))
    if replacements or fallback:
        return Decoding(METASPACE, tuple(replacements), fallback)
    if "WordPiece" in types or model.get("type") == "WordPiece":
        prefix = next((s.get("prefix") for s in decoder if s.get("type") == "WordPiece"), None)
        return Decoding(WORDPIECE, continuation=prefix or model.get("continuing_subword_prefix") or "##")
    return _from_vocab(model.get("vocab") or {}) if isinstance(model.get("vocab"), dict) else Decoding(PLAIN)


def tokenizer_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def tokenizer_family(tokenizer: Any) -> str:
    """'byte_level', 'metaspace', 'wordpiece' or 'plain'."""
    return tokenizer_decoding(tokenizer).family


def tokenizer_decoding(tokenizer: Any) -> Decoding:
    spec = tokenizer_json(tokenizer)
    return decoding_from_json(spec) if spec else _from_vocab(tokenizer.get_vocab())


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of the fast tokenizer's full JSON (the vocabulary-map cache key): equal hashes
    tokenise identically. Slow tokenizers hash their sorted vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def is_byte_piece(piece: str) -> bool:
    """`<0xNN>`: a SentencePiece byte-fallback piece."""
    if len(piece) != 6 or not piece.startswith("<0x") or not piece.endswith(">"):
        return False
    try:
        int(piece[3:5], 16)
    except ValueError:
        return False
    return True


def piece_bytes(piece: str, decoding: Decoding) -> bytes:
    """The bytes one ordinary (non-added, non-special) vocabulary piece stands for."""
    if decoding.family == BYTE_LEVEL:
        table = byte_level_table()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
        return piece.encode()  # not a byte-level piece (should not happen): literal text
    if decoding.byte_fallback and is_byte_piece(piece):
        return bytes([int(piece[3:5], 16)])
    if decoding.family == WORDPIECE and decoding.continuation and piece.startswith(decoding.continuation):
        piece = piece[len(decoding.continuation):]
    for pattern, content in decoding.replacements:
        piece = piece.replace(pattern, content)
    return piece.encode()


@dataclass(frozen=True)
class TokenTable:
    """Surface of every id of one tokenizer.

    surface:       list[str | None] [V] the id's bytes as latin-1 text; None = special/unused
    special:       bool  [V] special (control) tokens, never matched to text
    byte_fallback: bool  [V] `<0xNN>` pieces; they lose ties to regular pieces with the same
                   bytes (a SentencePiece tokenizer only emits them for bytes no piece covers)
    roles:         {"bos"|"eos"|"unk"|"pad": id} the tokenizer's declared special tokens
    family:        see module docstring
    """

    surface: list[str | None]
    special: np.ndarray
    byte_fallback: np.ndarray
    roles: dict[str, int]
    family: str

    def __len__(self) -> int:
        return len(self.surface)

    def stripped(self) -> list[str | None]:
        """Surfaces with the space marker removed: the strings the DTW cost compares."""
        return [None if s is None else strip_space(s) for s in self.surface]

    def text(self, ids: Any) -> list[str | None]:
        """Surfaces of a sequence of ids; ids outside the table are None."""
        n = len(self.surface)
        return [self.surface[i] if 0 <= i < n else None for i in np.asarray(ids).tolist()]


def strip_space(surface: str) -> str:
    """The space-marker-stripped string of a surface (`Ġthe` / `▁the` -> `the`)."""
    return surface.replace(" ", "")


def surface_bytes(surface: str | None) -> bytes | None:
    return None if surface is None else surface.encode("latin-1")


def token_table(tokenizer: Any, size: int | None = None) -> TokenTable:
    """The TokenTable of an HF tokenizer. `size` pads (with None) or cuts the table to the
    model's vocabulary size, which may exceed the tokenizer's (padded embedding rows)."""
    decoding = tokenizer_decoding(tokenizer)
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special_ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    special_ids |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
    literal = {int(i) for i, t in added.items() if not getattr(t, "special", False)}
    size = n if size is None else size
    surface: list[str | None] = [None] * size
    special = np.zeros(size, dtype=bool)
    fallback = np.zeros(size, dtype=bool)
    for i, piece in enumerate(pieces[:size]):
        if i in special_ids:
            special[i] = True
        elif piece is None:
            continue
        elif i in literal:
            surface[i] = piece.encode().decode("latin-1")
        else:
            surface[i] = piece_bytes(piece, decoding).decode("latin-1")
            fallback[i] = decoding.byte_fallback and is_byte_piece(piece)
    roles = {}
    for role in SPECIAL_ROLES:
        i = getattr(tokenizer, f"{role}_token_id", None)
        if isinstance(i, int) and 0 <= i < size:
            roles[role] = i
    return TokenTable(surface, special, fallback, roles, decoding.family)
