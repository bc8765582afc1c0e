"""Shared fixtures: a real Valkey server and a small real corpus + tokenizer."""

from pathlib import Path

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


# Modules that bring up whole stacks (SuperLink, SuperNodes, the energy simulation) replayed
# at a fixed speed-up. Under `pytest -n 2` (make test) they are one unit of work, run one
# after another on one worker, so two stacks never compete for the machine's cores; every
# other module runs whole (its module fixtures built once) on either worker beside them.
STACK_MODULES = {"test_e2e_demo", "test_flower_app", "test_manual_deployment"}


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown without it
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadFileScheduling

    class StackScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "stack" if Path(scope).stem in STACK_MODULES else scope

    return StackScheduling(config, log)
