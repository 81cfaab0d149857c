"""`app.engines.token_logprobs.vocab_bytes`: each token id's exact bytes from the tokenizer alone (logprobs need
no xgrammar), the same bytes xgrammar reads for byte-level (GPT-2/Qwen) and SentencePiece-style vocabularies."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from app.engines.grammar.matcher import GrammarCompiler
from app.engines.token_logprobs import TokenTexts, vocab_bytes

CORPUS = ["héllo wörld, ünïcode 漢字 tokens\n\ttabs", "the quick brown fox jumps over the lazy dog 42 times"] * 50


def sentencepiece_like() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer (Metaspace '▁', byte fallback `<0xNN>`), trained offline on a small corpus."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>",
                                                                                         *alphabet]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_byte_level_vocab_matches_xgrammar(tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    size = len(tok) + 7  # the model's logits may be padded past the vocabulary
    mine = vocab_bytes(tok, size)
    assert mine == GrammarCompiler(tok, size).vocab_bytes()
    assert mine[len(tok):] == [b""] * 7
    spaced = tok.convert_tokens_to_ids("Ġthe") if "Ġthe" in tok.get_vocab() else None
    if spaced is not None:
        assert mine[spaced] == b" the"


def test_sentencepiece_vocab_matches_xgrammar() -> None:
    tok = sentencepiece_like()
    size = len(tok)
    mine = vocab_bytes(tok, size)
    assert mine == GrammarCompiler(tok, size).vocab_bytes()
    assert mine[tok.convert_tokens_to_ids("<0x0A>")] == b"\n"
    assert any(b.startswith(b" ") for b in mine)  # '▁' became a space


def test_texts_are_built_once_per_tokenizer_and_size(tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert TokenTexts.for_tokenizer(tok, len(tok)) is TokenTexts.for_tokenizer(tok, len(tok))
    assert TokenTexts.for_tokenizer(tok, len(tok)) is not TokenTexts.for_tokenizer(tok, len(tok) + 1)


@pytest.mark.parametrize("raw", [b"\xe6", b"ab"])
def test_text_of_partial_characters_is_marked(raw: bytes) -> None:
    texts = TokenTexts([raw])
    assert texts.text(0) == ("ab" if raw == b"ab" else "bytes:\\xe6")
    assert texts.token_bytes(0) == raw and texts.token_bytes(5) == b""
