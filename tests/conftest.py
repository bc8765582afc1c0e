"""Shared fixtures: a real Valkey server and a small real corpus + tokenizer."""

from collections import Counter, defaultdict

import pytest
import regex


@pytest.fixture(scope="session")
def redis_url():
    """A real Valkey server on loopback with a password, for the whole test session."""
    from pilot.redis_server import EmbeddedValkey

    with EmbeddedValkey() as server:
        yield server.url


class PyBPETrainer:
    """Pure-Python stand-in with rustbpe.Tokenizer's training interface, used only while the
    rustbpe extension is not built. Byte-level BPE over regex pre-split chunks; pair counts
    are updated incrementally (only words containing the merged pair are touched)."""

    MAX_CHARS = 400_000  # keeps the fallback fast; rustbpe trains on the whole corpus

    def __init__(self):
        self.pattern = None
        self.merges: list[tuple[int, int]] = []

    def train_from_iterator(self, iterator, vocab_size, buffer_size=8192, pattern=None):
        from nanochat.tokenizer import SPLIT_PATTERN

        self.pattern = pattern or SPLIT_PATTERN
        compiled = regex.compile(self.pattern)
        chunks: Counter = Counter()
        seen = 0
        for text in iterator:
            chunks.update(compiled.findall(text))
            seen += len(text)
            if seen >= self.MAX_CHARS:
                break
        words = [list(c.encode("utf-8")) for c in chunks]
        freqs = list(chunks.values())
        pair_counts: Counter = Counter()
        where = defaultdict(set)
        for i, w in enumerate(words):
            for pair in zip(w, w[1:], strict=False):
                pair_counts[pair] += freqs[i]
                where[pair].add(i)
        for new_id in range(256, vocab_size):
            if not pair_counts:
                break
            best = max(pair_counts, key=lambda p: (pair_counts[p], -p[0], -p[1]))
            self.merges.append(best)
            for i in list(where[best]):
                w = words[i]
                for pair in zip(w, w[1:], strict=False):
                    pair_counts[pair] -= freqs[i]
                    if pair_counts[pair] <= 0:
                        del pair_counts[pair]
                merged, j = [], 0
                while j < len(w):
                    if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                        merged.append(new_id)
                        j += 2
                    else:
                        merged.append(w[j])
                        j += 1
                words[i] = merged
                for pair in zip(merged, merged[1:], strict=False):
                    pair_counts[pair] += freqs[i]
                    where[pair].add(i)
            del where[best]

    def get_pattern(self):
        return self.pattern

    def get_mergeable_ranks(self):
        token_bytes = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            token_bytes.append(token_bytes[a] + token_bytes[b])
        return [(t, rank) for rank, t in enumerate(token_bytes)]


def make_bpe_trainer():
    """rustbpe.Tokenizer() when the extension is built, else the pure-Python stand-in."""
    try:
        import rustbpe

        return rustbpe.Tokenizer()
    except (ImportError, AttributeError):  # not built: rustbpe/ is then a bare namespace dir
        return PyBPETrainer()


@pytest.fixture(scope="session")
def bpe_trainer():
    return make_bpe_trainer


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small real corpus (Python's bundled docs) as parquet shards: 3 training shards of
    48 docs in row groups of 16, plus a validation shard (the last). Returns the data dir."""
    from nanochat.dataset import demo_texts, write_shards

    out = tmp_path_factory.mktemp("demo_data")
    docs = demo_texts()[:200]
    write_shards(docs, out, shard_docs=48, row_group_size=16, val_fraction=0.1)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(demo_data, tmp_path_factory):
    """A 1024-token BPE tokenizer trained on demo_data's training shards; returns its dir."""
    from nanochat.dataset import chunk_table, read_row_group
    from nanochat.tokenizer import Tokenizer

    texts = (
        t for c in chunk_table(demo_data) for t in read_row_group(demo_data, c.shard, c.row_group)
    )
    out = tmp_path_factory.mktemp("tokenizer")
    Tokenizer.train(texts, vocab_size=1024, trainer=make_bpe_trainer()).save(out)
    return out
