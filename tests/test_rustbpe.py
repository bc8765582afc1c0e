"""rustbpe: merges identical to a pure-Python reference trainer, tiktoken compatibility, errors.

The reference below is the specification: byte-level BPE over regex pre-split chunks, merges
counted only inside chunks, each step merging the most frequent pair, ties broken by the
smallest (left_id, right_id), occurrences merged left to right without overlap, merge k
creating id 256 + k. It recounts everything each step, so it is slow but obviously right.
"""

import random
from collections import Counter

import pytest
import regex
import tiktoken

import rustbpe  # built by scripts/build_rustbpe.sh (make setup); a missing build must fail CI

NANOCHAT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


def merge_ids(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def reference_train(texts, vocab_size, pattern=NANOCHAT_PATTERN):
    chunks = Counter(chunk for text in texts for chunk in regex.findall(pattern, text))
    words = [(list(chunk.encode("utf-8")), n) for chunk, n in chunks.items()]
    merges = []
    for new_id in range(256, vocab_size):
        pairs = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = [(merge_ids(ids, best, new_id), n) for ids, n in words]
    return merges


def train(texts, vocab_size, **kwargs):
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(iter(texts), vocab_size, **kwargs)
    return tokenizer


def random_text(rng, alphabet, n_words, max_len=8):
    seps = [" ", " ", " ", "\n", "  ", "\t", ", ", ". "]
    return "".join(
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_len))) + rng.choice(seps)
        for _ in range(n_words)
    )


ENGLISH = [
    "The quick brown fox jumps over the lazy dog. It's what they'd done, isn't it?",
    "We'll see: the sites train only while the grid is curtailed; otherwise they pause.",
    "Renewable curtailment happens when wind and solar produce more than the grid can take.",
    "Tokenizers split text into chunks, then merge the most frequent pairs of tokens.",
] * 20


def corpus(name):
    rng = random.Random(name)
    if name == "ascii":
        return ENGLISH + [random_text(rng, "etaoinshrdlu", 200) for _ in range(10)]
    if name == "non_ascii":
        return [
            "Größere Übungen für Käse und Brötchen, ça va très bien, naïve façade.",
            "Привет, мир! Это проверка токенизатора на кириллице.",
            "東京は日本の首都です。自然言語処理のテスト。",
            "Ελληνικά γράμματα: αβγδε, και άλλα. עברית ועוד",
        ] * 10 + [random_text(rng, "äöüßéèàçñøåжщъяλπσ日本語", 150) for _ in range(8)]
    if name == "emoji":
        emoji = ["😀", "👍🏽", "👨‍👩‍👧", "🇩🇪", "🔥", "❤️", "🚀", "🤖"]
        return ["I love 🚀🚀 and 🔥! " * 5, "family: 👨‍👩‍👧 👨‍👩‍👧, flags 🇩🇪🇫🇷"] + [
            random_text(rng, emoji + list("ab"), 150, max_len=4) for _ in range(8)
        ]
    if name == "whitespace":
        return [
            "a  b   c    d\n\n\ne\t\tf \r\n g\r\n\r\n",
            "    indented\n        more\n\t\ttabs\n   \n",
            "trailing   \nspaces    \n     \n\n\n\n",
        ] * 10 + [random_text(rng, " \t\n\rxy", 200, max_len=6) for _ in range(6)]
    if name == "digits":
        return [
            "In 2024, 1234567 tokens cost $3.50; call 555-0199 on 2025-01-31 at 13:45.",
            "3.14159265358979 2.71828 1e10 0x1F 007 42 42 42",
        ] * 10 + [random_text(rng, "0123456789.,-", 200, max_len=10) for _ in range(6)]
    if name == "overlapping_runs":
        # Pairs like (a, a) overlap inside runs: exercises the left-to-right rule.
        return ["aaaaaaa aaa aa abababab bbbb aaaab " * 3, "zzzzzzzzzzzz zz zzz"]
    raise ValueError(name)


CORPORA = ["ascii", "non_ascii", "emoji", "whitespace", "digits", "overlapping_runs"]


@pytest.mark.parametrize("name", CORPORA)
def test_merges_identical_to_python_reference(name):
    texts = corpus(name)
    vocab_size = 256 + 120
    assert train(texts, vocab_size).get_merges() == reference_train(texts, vocab_size)


def test_merges_identical_to_reference_with_custom_pattern():
    pattern = r"\S+|\s+"
    texts = corpus("ascii") + corpus("emoji")
    tokenizer = train(texts, 256 + 80, pattern=pattern)
    assert tokenizer.get_pattern() == pattern
    assert tokenizer.get_merges() == reference_train(texts, 256 + 80, pattern)


def test_default_pattern_is_nanochats():
    assert rustbpe.Tokenizer().get_pattern() == NANOCHAT_PATTERN
    assert train(corpus("ascii"), 300).get_pattern() == NANOCHAT_PATTERN


def test_mergeable_ranks_are_bytes_then_merges_in_order():
    tokenizer = train(corpus("non_ascii"), 256 + 50)
    ranks = tokenizer.get_mergeable_ranks()
    assert [rank for _, rank in ranks] == list(range(256 + 50))
    assert [token for token, _ in ranks[:256]] == [bytes([b]) for b in range(256)]
    for k, (left, right) in enumerate(tokenizer.get_merges()):
        assert ranks[256 + k][0] == ranks[left][0] + ranks[right][0]
    assert tokenizer.vocab_size == 256 + 50


# Code points sampled across all planes (surrogates excluded: str can't be UTF-8 encoded).
SPARSE_CODE_POINTS = [c for c in range(0x20, 0x110000, 997) if not 0xD800 <= c < 0xE000]


def random_unicode(rng, n):
    pools = [
        lambda: chr(rng.randint(0x20, 0x7E)),
        lambda: chr(rng.randint(0xA0, 0x2FFF)),
        lambda: chr(rng.randint(0x4E00, 0x9FFF)),
        lambda: chr(rng.randint(0x1F300, 0x1FAFF)),
        lambda: chr(rng.choice([0x200D, 0xFE0F, 0x0301])),  # joiners and combining marks
        lambda: rng.choice([" ", "  ", "\n", "\r\n", "\t", "   \n"]),
        lambda: str(rng.randint(0, 99999)),
        lambda: chr(rng.choice(SPARSE_CODE_POINTS)),
    ]
    return "".join(rng.choice(pools)() for _ in range(n))


def test_tiktoken_round_trips_random_unicode_and_agrees_with_encode():
    tokenizer = train([text for name in CORPORA for text in corpus(name)], 256 + 300)
    encoding = tiktoken.Encoding(
        name="rustbpe-test",
        pat_str=tokenizer.get_pattern(),
        mergeable_ranks=dict(tokenizer.get_mergeable_ranks()),
        special_tokens={},
    )
    assert encoding.n_vocab == tokenizer.vocab_size
    rng = random.Random(7)
    texts = [random_unicode(rng, rng.randint(0, 300)) for _ in range(200)]
    texts += [text for name in CORPORA for text in corpus(name)[:3]]
    for text in texts:
        ids = encoding.encode_ordinary(text)
        assert encoding.decode(ids) == text
        assert tokenizer.encode(text) == ids
    assert tokenizer.batch_encode(texts) == [encoding.encode_ordinary(t) for t in texts]


def splitter(pattern):
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(["x"], 256, pattern=pattern)
    return tokenizer.split


def test_fast_default_split_equals_the_general_regex_engine():
    # The default pattern runs on a lookaround-free equivalent; the same pattern wrapped in a
    # group is not recognised and runs on fancy-regex, the engine tiktoken uses.
    fast, general = splitter(NANOCHAT_PATTERN), splitter(f"(?:{NANOCHAT_PATTERN})")
    rng = random.Random(11)
    edge_cases = ["", " ", "  ", "a  b", "a \n b", "x\t\t y", "  \r\n  z", "end   ", "1234567"]
    texts = edge_cases + [random_unicode(rng, rng.randint(0, 200)) for _ in range(500)]
    # Dense mixes of the characters the alternatives hinge on: whitespace kinds, line breaks,
    # letters, digits, punctuation, apostrophes (incl. the case-folding long s).
    tricky = [
        " ",
        " ",
        "\t",
        "\n",
        "\r",
        "\u00a0",
        "\u3000",
        "a",
        "é",
        "1",
        "٣",
        ".",
        "'",
        "s",
        "ſ",
        "🚀",
    ]
    texts += ["".join(rng.choices(tricky, k=rng.randint(1, 40))) for _ in range(3000)]
    for text in texts:
        chunks = fast(text)
        assert chunks == general(text), repr(text)
        assert "".join(chunks) == text


def test_default_split_matches_python_regex_module():
    split = splitter(NANOCHAT_PATTERN)
    for name in CORPORA:
        for text in corpus(name):
            assert split(text) == regex.findall(NANOCHAT_PATTERN, text)


def test_trained_tokens_compress_the_training_text():
    tokenizer = train(ENGLISH, 256 + 200)
    n_bytes = sum(len(t.encode()) for t in ENGLISH)
    n_tokens = sum(len(ids) for ids in tokenizer.batch_encode(ENGLISH))
    assert n_tokens < n_bytes / 3


def test_untrained_tokenizer_encodes_utf8_bytes():
    tokenizer = rustbpe.Tokenizer()
    assert tokenizer.vocab_size == 256
    assert tokenizer.encode("hé 🚀") == list("hé 🚀".encode())


def test_buffer_size_does_not_change_the_merges():
    texts = corpus("digits") + corpus("emoji")
    assert (
        train(texts, 256 + 60, buffer_size=1).get_merges()
        == train(texts, 256 + 60, buffer_size=8192).get_merges()
    )


def test_trains_from_generator_and_list():
    texts = corpus("whitespace")
    from_generator = rustbpe.Tokenizer()
    from_generator.train_from_iterator((t for t in texts), 256 + 40)
    from_list = rustbpe.Tokenizer()
    from_list.train_from_iterator(texts, 256 + 40)
    assert from_generator.get_merges() == from_list.get_merges()


def test_training_stops_early_when_no_pairs_are_left():
    tokenizer = train(["ab ab ab"], 1000)
    # "ab" and " ab" become single tokens; then every chunk is one token.
    assert tokenizer.vocab_size == 258
    assert tokenizer.get_merges() == reference_train(["ab ab ab"], 1000)


def test_vocab_size_256_learns_no_merges():
    assert train(corpus("ascii"), 256).get_merges() == []


@pytest.mark.parametrize("vocab_size", [255, 0, -1, 2**32, 2**70])
def test_vocab_size_out_of_range_is_a_value_error(vocab_size):
    with pytest.raises(
        (ValueError, OverflowError), match="vocab_size must be at least 256|too large"
    ):
        train(["hello"], vocab_size)


def test_huge_vocab_size_stops_when_the_corpus_runs_out_of_pairs():
    assert train(["hello world"], 2**32 - 1).vocab_size == 256 + 4 + 5  # "hello", " world"


def test_batch_encode_rejects_a_bare_string():
    with pytest.raises(TypeError):
        rustbpe.Tokenizer().batch_encode("not a list")


def test_non_string_item_is_a_type_error_naming_the_item():
    with pytest.raises(TypeError, match="item 1 is int"):
        train(["hello", 42], 300)
    with pytest.raises(TypeError, match="item 0 is bytes"):
        train([b"hello"], 300)


def test_non_iterable_or_bare_string_is_a_type_error():
    with pytest.raises(TypeError, match="iterable of str"):
        rustbpe.Tokenizer().train_from_iterator(12, 300)
    with pytest.raises(TypeError, match="single str"):
        rustbpe.Tokenizer().train_from_iterator("a corpus, not a list", 300)


def test_empty_iterator_is_a_value_error():
    with pytest.raises(ValueError, match="no text"):
        train([], 300)
    with pytest.raises(ValueError, match="no text"):
        train(["", ""], 300)


def test_bad_pattern_and_buffer_size_are_value_errors():
    with pytest.raises(ValueError, match="invalid split pattern"):
        train(["hello"], 300, pattern="(unclosed")
    with pytest.raises(ValueError, match="buffer_size"):
        train(["hello"], 300, buffer_size=0)


def test_huge_buffer_size_just_means_one_buffer():
    texts = corpus("digits")
    assert train(texts, 300, buffer_size=2**60).get_merges() == train(texts, 300).get_merges()


def test_exception_from_the_iterator_propagates():
    def failing():
        yield "hello world"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        rustbpe.Tokenizer().train_from_iterator(failing(), 300)


def test_failed_training_keeps_the_previous_vocabulary():
    tokenizer = train(corpus("ascii"), 300)
    merges = tokenizer.get_merges()
    with pytest.raises(TypeError):
        tokenizer.train_from_iterator(["ok", None], 400)
    assert tokenizer.get_merges() == merges
