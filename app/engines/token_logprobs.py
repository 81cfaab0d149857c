"""Per-token logprobs as engines report them: the chosen token's logprob and the top-k, with each token's text.

Values follow vLLM 0.32's default (`logprobs_mode="raw_logprobs"`): log_softmax (float32) of the model's logits
as the sampler receives them, i.e. after the grammar mask of constrained decoding (vLLM applies the bitmask
before its sampler) and before penalties, min_tokens/ignore_eos masking, temperature and top-p. Greedy decoding
therefore reports the same numbers on every engine for the same model.

A decode step calls `top_logprobs(row, chosen, k)` (torch, one sequence's row) or `batch_top_logprobs` (one
call for a batch); the numbers then get their text from `TokenTexts` (built once per tokenizer from each id's
exact bytes), giving `TokenLogprob`s (`app.engines.base`, part of the engine protocol): plain frozen dataclasses
that pickle across Ray and torch.distributed and
that the API layer turns into OpenAI's shapes (`app.api.logprobs`). The vLLM adapter feeds vLLM's numbers
through the same `TokenTexts.entry`, so token strings are the same on every engine too.
"""

from __future__ import annotations

import functools
import json
import threading
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

from app.engines.base import TokenCandidate, TokenLogprob

__all__ = ["MAX_TOP_LOGPROBS", "TokenCandidate", "TokenLogprob", "TokenTexts", "batch_top_logprobs",
           "top_logprobs"]

MAX_TOP_LOGPROBS = 20  # vLLM 0.32's default max_logprobs; OpenAI allows 20 for chat


_TEXTS: weakref.WeakKeyDictionary[Any, dict[int, TokenTexts]] = weakref.WeakKeyDictionary()
_TEXTS_LOCK = threading.Lock()


@functools.cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet reversed: the printable character each byte is written as -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _decoder_kind(tokenizer: Any) -> str:
    """How the tokenizer writes bytes in its vocabulary: byte_level (GPT-2, Qwen, Llama 3), byte_fallback
    (SentencePiece: '▁' for a space, `<0xNN>` for a raw byte) or raw (the token string is the text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "raw"
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds = [d.get("type") for d in decoder.get("decoders", [decoder])]
    if "ByteLevel" in kinds:
        return "byte_level"
    if "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
        return "byte_fallback"
    return "raw"


def vocab_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """Each token id's exact bytes (ids past the tokenizer's vocabulary, the model's padding: empty), read from
    the tokenizer alone, so logprobs need nothing beyond the base install."""
    kind = _decoder_kind(tokenizer)
    table = _byte_level_table()
    out: list[bytes] = []
    for token_id in range(vocab_size):
        token = tokenizer.convert_ids_to_tokens(token_id) if token_id < len(tokenizer) else None
        if not token:
            out.append(b"")
        elif kind == "byte_level" and all(ch in table for ch in token):
            out.append(bytes(table[ch] for ch in token))
        elif kind == "byte_fallback" and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            out.append(bytes([int(token[3:5], 16)]))
        elif kind == "byte_fallback":
            out.append(token.replace("\u2581", " ").encode("utf-8"))
        else:  # special tokens (and raw vocabularies): their text as written
            out.append(token.encode("utf-8"))
    return out


class TokenTexts:
    """Token id -> text and bytes, from the exact bytes of each vocabulary entry (`vocab_bytes`)."""

    def __init__(self, vocab_bytes: Sequence[bytes]):
        self._bytes = list(vocab_bytes)
        self._text: dict[int, str] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int) -> TokenTexts:
        """The shared texts of `tokenizer` for a model whose logits have `vocab_size` entries (built once)."""
        with _TEXTS_LOCK:
            per_vocab = _TEXTS.setdefault(tokenizer, {})
            if vocab_size not in per_vocab:
                per_vocab[vocab_size] = cls(vocab_bytes(tokenizer, vocab_size))
            return per_vocab[vocab_size]

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def text(self, token_id: int) -> str:
        hit = self._text.get(token_id)
        if hit is None:
            raw = self.token_bytes(token_id)
            try:
                hit = raw.decode("utf-8")
            except UnicodeDecodeError:  # part of a character split across tokens
                hit = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            self._text[token_id] = hit
        return hit

    def candidate(self, token_id: int, logprob: float) -> TokenCandidate:
        return TokenCandidate(token_id, self.text(token_id), self.token_bytes(token_id), float(logprob))

    def entry(self, chosen_id: int, chosen_logprob: float, candidates: Iterable[tuple[int, float]],
              k: int) -> TokenLogprob:
        """The position's entry from (token id, logprob) pairs, any order, possibly including the chosen token
        (vLLM's logprob dicts hold the sampled token plus its top-k): `top` keeps the `k` most likely."""
        best: dict[int, float] = {}
        for tid, lp in candidates:
            best[int(tid)] = float(lp)
        ranked = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        return TokenLogprob(self.candidate(chosen_id, chosen_logprob),
                            tuple(self.candidate(tid, lp) for tid, lp in ranked))


def top_logprobs(logits: Any, chosen: int, k: int) -> tuple[int, float, list[tuple[int, float]]]:
    """(chosen, its logprob, the k most likely as (id, logprob)) from one sequence's 1-D logits row."""
    import torch

    lp = torch.log_softmax(logits.float(), dim=-1)
    pairs: list[tuple[int, float]] = []
    if k > 0:
        values, ids = torch.topk(lp, min(k, lp.shape[-1]))
        pairs = list(zip(ids.tolist(), values.tolist(), strict=True))
    return chosen, float(lp[chosen]), pairs


def batch_top_logprobs(logits: Any, chosen: Sequence[int], ks: Sequence[int | None]) -> list[
        tuple[int, float, list[tuple[int, float]]] | None]:
    """`top_logprobs` for each row of a [batch, vocab] logits tensor in one log_softmax/topk; rows whose k is
    None (no logprobs requested) get None."""
    import torch

    rows = [i for i, k in enumerate(ks) if k is not None]
    out: list[tuple[int, float, list[tuple[int, float]]] | None] = [None] * len(ks)
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), dim=-1)
    kmax = min(max(ks[i] or 0 for i in rows), lp.shape[-1])
    values, ids = torch.topk(lp, kmax, dim=-1)  # kmax 0 gives empty [rows, 0] tensors
    picked = lp.gather(1, torch.tensor([[chosen[i]] for i in rows], device=lp.device)).squeeze(1).tolist()
    for j, i in enumerate(rows):
        k = min(ks[i] or 0, kmax)
        pairs = list(zip(ids[j, :k].tolist(), values[j, :k].tolist(), strict=True))
        out[i] = (int(chosen[i]), float(picked[j]), pairs)
    return out
