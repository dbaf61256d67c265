"""CLIP tokenizer from the shipped files, and A1111's 75-token chunking."""

import json

import pytest

from app.models.tokenizer import TokenizerError, load_clip_tokenizer
from app.prompts.chunking import CHUNK_LENGTH, TokenIds, chunk_prompt


@pytest.fixture(scope="module")
def tokenizer():
    return load_clip_tokenizer()


@pytest.fixture(scope="module")
def tokenize(tokenizer):
    return lambda texts: tokenizer(texts, add_special_tokens=False, truncation=False)["input_ids"]


@pytest.fixture(scope="module")
def ids(tokenizer):
    return TokenIds(49406, 49407, 49407, tokenizer.get_vocab()[",</w>"])


def test_clip_ids_match_reference(tokenizer):
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77


def test_broken_vocab_is_refused_with_a_message(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="did not load correctly"):
        load_clip_tokenizer(tmp_path)


def test_short_prompt_is_one_padded_chunk(tokenize, ids):
    chunks, count = chunk_prompt("a photo of a cat", tokenize, ids)
    assert count == 5
    assert len(chunks) == 1
    assert chunks[0].tokens[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(chunks[0].tokens) == CHUNK_LENGTH + 2
    assert chunks[0].tokens[7:] == [49407] * 70


def test_weights_follow_their_tokens(tokenize, ids):
    chunks, _ = chunk_prompt("a (photo:1.5) of [cat]", tokenize, ids)
    assert chunks[0].multipliers[:6] == [1.0, 1.0, 1.5, 1.0, pytest.approx(1 / 1.1), 1.0]


def test_break_starts_a_new_chunk(tokenize, ids):
    chunks, count = chunk_prompt("a cat BREAK a dog", tokenize, ids)
    assert len(chunks) == 2
    assert chunks[1].tokens[:4] == [49406, 320, 1929, 49407]
    assert count == CHUNK_LENGTH + 2  # A1111 counts a closed chunk as 75


def test_long_prompt_splits_at_last_comma(tokenize, ids):
    # 70 single-token words, a comma, then 10 more words: the chunk fills at 75 tokens with the comma
    # 4 tokens back, so the words after the comma move to the second chunk whole.
    prompt = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    chunks, count = chunk_prompt(prompt, tokenize, ids)
    assert len(chunks) == 2
    first = chunks[0].tokens[1:-1]
    assert first[:71] == [2368] * 70 + [ids.comma]
    assert set(first[71:]) == {49407}  # padded after the comma
    assert chunks[1].tokens[1:11] == [1929] * 10
    assert count == CHUNK_LENGTH + 10


def test_no_comma_means_hard_split_at_75(tokenize, ids):
    chunks, _ = chunk_prompt(" ".join(["cat"] * 80), tokenize, ids)
    assert [c.tokens[1:-1].count(2368) for c in chunks] == [75, 5]


def test_open_clip_padding_uses_zero_after_end(tokenize):
    sd2_ids = TokenIds(49406, 49407, 0, 267)
    chunks, _ = chunk_prompt("a cat", tokenize, sd2_ids)
    assert chunks[0].tokens[:4] == [49406, 320, 2368, 49407]
    assert set(chunks[0].tokens[4:]) == {0}
