"""Tokenizer: round-trip, special tokens, save/load, byte lengths, errors."""

import pytest

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerError


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox.",
        "def f(x):\n    return x ** 2  # 12345",
        "naïve café — ünïcödé ✓ 日本語",
        "",
        "  \n\n\t",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.bos_token_id for i in ids)  # ordinary text never yields specials


def test_vocab_and_special_tokens(tok):
    assert tok.vocab_size == 1024
    assert tok.bos_token_id == 1024 - len(SPECIAL_TOKENS)
    # special-token strings in text are ordinary text, not control tokens
    assert tok.bos_token_id not in tok.encode("<|bos|> hello")
    assert tok.encode("hi", prepend="<|bos|>")[0] == tok.bos_token_id


def test_compresses_english(tok):
    text = "The module provides functions for working with files and directories."
    assert len(text.encode()) / len(tok.encode(text)) > 2.0  # bytes per token


def test_batch_encode_matches_single(tok):
    texts = ["alpha beta", "gamma\n\ndelta", "x = 1"]
    batch = tok.encode(texts, prepend=tok.bos_token_id)
    assert batch == [[tok.bos_token_id, *tok.encode(t)] for t in texts]


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.shape == (tok.vocab_size,)
    assert (tb[:256] == 1).all() and (tb[tok.bos_token_id :] == 0).all()
    ids = tok.encode("bits per byte needs exact byte counts ✓")
    assert int(tb[ids].sum()) == len("bits per byte needs exact byte counts ✓".encode())


def test_save_load_identical(tok, tmp_path):
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    text = "Return the absolute value of the argument."
    assert again.encode(text) == tok.encode(text)
    assert (tmp_path / "token_bytes.pt").is_file()


def test_train_small_corpus():
    texts = ["hello hello hello world"] * 50 + [
        f"word{i} and more words {i * 7}" for i in range(200)
    ]
    tok = Tokenizer.train(texts, vocab_size=300)
    assert tok.vocab_size == 300
    assert len(tok.encode(" hello")) == 1


def test_errors(tmp_path):
    with pytest.raises(TokenizerError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(TokenizerError, match="tok_train"):
        Tokenizer.load(tmp_path / "nowhere")
