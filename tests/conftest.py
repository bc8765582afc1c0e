"""Shared fixtures: a real Valkey server and a small real corpus + tokenizer."""

import pytest


@pytest.fixture(scope="session")
def redis_url():
    """A real Valkey server on loopback with a password, for the whole test session."""
    from pilot.infra.valkey import EmbeddedValkey

    with EmbeddedValkey() as server:
        yield server.url


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
    Tokenizer.train(texts, vocab_size=1024).save(out)  # through rustbpe
    return out
