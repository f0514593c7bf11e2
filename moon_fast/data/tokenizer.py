"""Tokenizers: a WordPiece tokenizer trained on the synthetic catalog's text (special tokens at the
fixed ids of :mod:`moon_fast.data.batch`), or a checkpoint's own tokenizer from its local directory.

Whatever the source, the pipeline talks to a :class:`TextTokenizer`: ``encode(text) -> list[int]``
without special tokens, plus the ids of the special tokens the packing needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .batch import EOS_ID, IMAGE_PAD_ID, PAD_ID, SPECIAL_TOKENS, VISION_END_ID, VISION_START_ID


def train_tokenizer(texts, vocab_size: int = 4096):
    """A lower-cased WordPiece ``tokenizers.Tokenizer`` fitted on ``texts``; SPECIAL_TOKENS get ids 0..4.

    The vocabulary is built deterministically (the ``tokenizers`` WordPiece trainer breaks frequency
    ties in hash order, so its vocabulary changes from run to run): the special tokens, ``[UNK]``, every
    character seen (alone and as a ``##`` continuation, so unseen words still tokenize), then whole
    words by decreasing frequency (ties alphabetical) up to ``vocab_size``."""
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(t)))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, "[UNK]"])}
    chars = sorted({c for w in words for c in w})
    for c in chars + ["##" + c for c in chars]:
        vocab.setdefault(c, len(vocab))
    for w, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(w, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(vocab)} special and character tokens")
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, f"special token {t} got id {tok.token_to_id(t)}, expected {i}"
    return tok


@dataclass
class TextTokenizer:
    """A thin wrapper giving the pipeline one interface over ``tokenizers`` and HF tokenizers."""

    backend: object
    pad_id: int = PAD_ID
    eos_id: int = EOS_ID
    vision_start_id: int = VISION_START_ID
    vision_end_id: int = VISION_END_ID
    image_pad_id: int = IMAGE_PAD_ID
    source: str = ""

    def encode(self, text: str) -> list[int]:
        b = self.backend
        if hasattr(b, "encode") and hasattr(b, "get_vocab_size"):  # tokenizers.Tokenizer
            return b.encode(text, add_special_tokens=False).ids
        return list(b(text, add_special_tokens=False)["input_ids"])  # transformers tokenizer

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        b = self.backend
        if hasattr(b, "encode_batch"):
            return [e.ids for e in b.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    @property
    def vocab_size(self) -> int:
        b = self.backend
        return b.get_vocab_size() if hasattr(b, "get_vocab_size") else len(b)

    def save(self, directory: str | os.PathLike) -> None:
        b = self.backend
        if hasattr(b, "save_pretrained"):
            b.save_pretrained(str(directory))
        else:
            b.save(str(Path(directory) / "tokenizer.json"))


def _special_ids(lookup) -> dict:
    ids = {}
    for name, tok in zip(("pad_id", "eos_id", "vision_start_id", "vision_end_id", "image_pad_id"), SPECIAL_TOKENS):
        i = lookup(tok)
        if i is not None:
            ids[name] = i
    if "pad_id" not in ids and "eos_id" in ids:
        ids["pad_id"] = ids["eos_id"]
    missing = {"vision_start_id", "vision_end_id", "image_pad_id"} - set(ids)
    if missing:
        raise ValueError(f"tokenizer lacks the vision special tokens {sorted(missing)} "
                         f"(expected {SPECIAL_TOKENS[2:]}, as in Qwen2-VL)")
    return ids


def load_tokenizer(path: str | os.PathLike) -> TextTokenizer:
    """The tokenizer in ``path``: a ``tokenizer.json`` file, or a directory holding one (a synthetic
    catalog, a run's ``final/``, or a local Qwen2(-VL) checkpoint, read with transformers when it has a
    ``tokenizer_config.json``). Nothing is downloaded."""
    p = Path(path)
    if p.is_dir() and (p / "tokenizer_config.json").exists():
        try:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            return TextTokenizer(hf, source=str(p), **_special_ids(lambda t: _hf_id(hf, t)))
        except (OSError, ValueError) as e:
            if not (p / "tokenizer.json").exists():
                raise ValueError(f"cannot load the tokenizer in {p}: {e}") from e
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: expected a tokenizer.json file or a directory with one "
                                f"(run `moon-fast data synth` for the synthetic catalog's)")
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(f))
    return TextTokenizer(tok, source=str(f), **_special_ids(tok.token_to_id))


def _hf_id(hf, token: str):
    i = hf.convert_tokens_to_ids(token)
    return None if i is None or i == hf.unk_token_id else i
