"""Constrained decoding inside our own decode loops (transformers engine, DeepSpeed TP rank 0).

- `GrammarCompiler.for_tokenizer(tokenizer, vocab_size)`: one per tokenizer (cached), holding xgrammar's
  tokenizer info; `compile(spec)` caches compiled grammars per spec, so one (tokenizer, spec) compiles once.
- `SequenceMatcher`: the per-sequence logits processor. It keeps its own grammar state and bitmask, so in a
  batched decode step each running sequence masks its own row: `mask_logits(logits[i])`, then
  `accept(token)`; `is_terminated()` once the grammar accepted a stop token; `reset()` to start over.

Masking works on any device without triton: on CPU it uses xgrammar's CPU kernel, elsewhere the bitmask is moved
to the logits' device and applied with torch ops.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any

from app.engines.grammar.install import require_xgrammar
from app.engines.grammar.specs import GrammarSpec

_COMPILERS: weakref.WeakKeyDictionary[Any, dict[int, GrammarCompiler]] = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


class GrammarCompiler:
    """xgrammar's compiler for one tokenizer, with an LRU cache of compiled grammars keyed by `GrammarSpec`."""

    def __init__(self, tokenizer: Any, vocab_size: int, *, cache_size: int = 256):
        xgr = require_xgrammar()
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=2)
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, vocab_size: int) -> GrammarCompiler:
        """The shared compiler of `tokenizer` for a model whose logits have `vocab_size` entries."""
        with _COMPILERS_LOCK:
            per_vocab = _COMPILERS.setdefault(tokenizer, {})
            if vocab_size not in per_vocab:
                per_vocab[vocab_size] = cls(tokenizer, vocab_size)
            return per_vocab[vocab_size]

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self.info.stop_token_ids)

    def vocab_bytes(self) -> list[bytes]:
        """Each token id's text as bytes, as xgrammar reads the vocabulary (tests hold
        `app.engines.token_logprobs.vocab_bytes` against it)."""
        return list(self.info.decoded_vocab)

    def compile(self, spec: GrammarSpec) -> Any:
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        compiled = self._compiler.compile_grammar(spec.ebnf)  # outside the lock: compiles may run in parallel
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec) -> SequenceMatcher:
        return SequenceMatcher(self.compile(spec), self.vocab_size)

    def cache_len(self) -> int:
        return len(self._cache)


class GrammarViolation(RuntimeError):
    """A token the grammar does not allow was accepted: the mask was not applied before sampling."""


class SequenceMatcher:
    """Grammar state of one sequence: mask its logits row, accept the chosen token, tell when it is done."""

    def __init__(self, compiled: Any, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self._matcher = xgr.GrammarMatcher(compiled)
        self.vocab_size = vocab_size
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)[0]

    def mask_logits(self, logits: Any) -> None:
        """Set the logits of tokens the grammar forbids next to -inf, in place. `logits` is one sequence's 1-D
        row (a view into a batch is fine); entries past `vocab_size` (padding) are forbidden too."""
        if logits.dim() != 1:
            raise ValueError(f"mask_logits takes one sequence's 1-D logits row, got shape {tuple(logits.shape)}")
        if self._matcher.is_terminated():
            raise GrammarViolation("the grammar already terminated: nothing may follow")
        self._matcher.fill_next_token_bitmask(self._bitmask)
        if logits.shape[0] > self.vocab_size:
            logits[self.vocab_size :] = float("-inf")
        if logits.device.type == "cpu":
            self._xgr.apply_token_bitmask_inplace(logits, self._bitmask, vocab_size=self.vocab_size)
        else:
            bitmask = self._bitmask.to(logits.device, non_blocking=True)
            self._xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size,
                                                  backend="torch_native")

    def accept(self, token_id: int) -> None:
        """Advance past `token_id`; `GrammarViolation` if the grammar does not allow it here."""
        if not self._matcher.accept_token(int(token_id)):
            raise GrammarViolation(f"token {token_id} is not allowed by the grammar here")

    def is_terminated(self) -> bool:
        """True once the grammar is complete and accepted a stop token (EOS): the generation must end."""
        return bool(self._matcher.is_terminated())

    def is_completed(self) -> bool:
        """True when the text so far is a complete match (a stop token may come next, or more text may)."""
        return bool(self._matcher.is_completed())

    def reset(self) -> None:
        self._matcher.reset()
