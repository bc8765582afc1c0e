"""DataLoader: BOS-aligned packing, exact resume, DDP striding, ledger accounting."""

import json

import pytest
import torch

from nanochat.dataloader import PACKINGS, DataLoader, chunk_key
from nanochat.dataset import DatasetError, chunk_table, read_row_group
from nanochat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return Tokenizer.load(tokenizer_dir)


@pytest.mark.parametrize("packing", PACKINGS)
def test_packing_invariants(tok, demo_data, packing):
    B, T = 4, 128
    loader = DataLoader(tok, demo_data, B, T, packing=packing)
    for _ in range(5):
        x, y = next(loader)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        assert (x[:, 0] == tok.bos_token_id).all()  # every row starts a document
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
        assert ((x >= 0) & (x < tok.vocab_size)).all()  # full rows, no padding
    # every token of every consumed document is placed, counted as cropped, or still held
    docs = []
    for c in chunk_table(demo_data):
        rows = loader.consumed()[chunk_key(c.shard, c.row_group)]
        docs += read_row_group(demo_data, c.shard, c.row_group)[:rows]
    doc_tokens = sum(len(d) for d in tok.encode(docs, prepend=tok.bos_token_id))
    placed = 5 * B * (T + 1)
    assert doc_tokens == placed + loader.stats["cropped_tokens"] + loader.stats["held_tokens"]
    assert loader.stats["cropped_tokens"] > 0 and loader.stats["docs"] == len(docs)
    assert (loader.stats["held_tokens"] > 0) == (packing == "bestfit")


def test_bestfit_crops_fewer_tokens_than_greedy_for_the_same_batches(tok, demo_data):
    cropped = {}
    for packing in PACKINGS:
        loader = DataLoader(tok, demo_data, 4, 256, packing=packing)
        for _ in range(10):
            next(loader)
        cropped[packing] = loader.stats["cropped_tokens"]
    assert cropped["bestfit"] < 0.75 * cropped["greedy"], cropped


def test_bestfit_trains_its_held_documents_at_the_end_of_the_data_then_stops(tok, demo_data):
    c = chunk_table(demo_data)[0]
    calls = []

    def refill():
        calls.append(1)
        return [], {}

    loader = DataLoader(tok, demo_data, 1, 64, chunks=[c], packing="bestfit", refill=refill)
    batches = list(loader)
    assert batches and loader.consumed() == {chunk_key(c.shard, c.row_group): c.rows}
    assert len(calls) == 1  # the end of the lease is asked for once
    # what is left held at the end did not fill a row: less than one row of tokens
    assert loader.stats["held_tokens"] < 65


@pytest.mark.parametrize("packing", PACKINGS)
def test_resume_yields_identical_batches(tok, demo_data, packing):
    ref = DataLoader(tok, demo_data, 2, 64, packing=packing)
    expected = [next(ref) for _ in range(12)]
    first = DataLoader(tok, demo_data, 2, 64, packing=packing)
    for i in range(5):
        assert torch.equal(next(first)[0], expected[i][0])
    cursor = json.loads(json.dumps(first.cursor()))  # survives serialisation
    resumed = DataLoader(tok, demo_data, 2, 64, cursor=cursor, packing=packing)
    for i in range(5, 12):
        x, y = next(resumed)
        assert torch.equal(x, expected[i][0]) and torch.equal(y, expected[i][1])
    assert resumed.consumed() == ref.consumed()


def test_rank_striding_is_disjoint_and_complete(tok, demo_data):
    chunks = chunk_table(demo_data)
    loaders = [DataLoader(tok, demo_data, 1, 32, rank=r, world=2) for r in range(2)]
    assert [(c.shard, c.row_group) for c in loaders[0].chunks] == [
        (c.shard, c.row_group) for c in chunks[0::2]
    ]
    assert [(c.shard, c.row_group) for c in loaders[1].chunks] == [
        (c.shard, c.row_group) for c in chunks[1::2]
    ]
    next(loaders[0]), next(loaders[1])
    keys = [{k for k, v in ld.consumed().items()} for ld in loaders]
    assert not keys[0] & keys[1] and keys[0] | keys[1] == {
        chunk_key(c.shard, c.row_group) for c in chunks
    }
    # a list of cursors (what TrainResult.cursor holds) is indexed by rank
    both = [ld.cursor() for ld in loaders]
    assert DataLoader(tok, demo_data, 1, 32, rank=1, world=2, cursor=both).cursor() == both[1]


def test_assignment_with_start_rows_and_end_of_data(tok, demo_data):
    c0, c1 = chunk_table(demo_data)[:2]
    loader = DataLoader(
        tok, demo_data, 1, 64, chunks=[c0, c1], start_rows={chunk_key(c0.shard, c0.row_group): 10}
    )
    assert loader.cursor()["row"] == 10
    n = 0
    with pytest.raises(StopIteration):
        while True:
            next(loader)
            n += 1
    assert n > 0
    assert loader.consumed() == {
        chunk_key(c0.shard, c0.row_group): c0.rows,
        chunk_key(c1.shard, c1.row_group): c1.rows,
    }
    assert loader.stats["docs"] == c0.rows - 10 + c1.rows  # rows before start_rows never read


def test_refill_appends_chunks_when_the_assignment_runs_dry(tok, demo_data):
    c0, c1, c2 = chunk_table(demo_data)[:3]
    handed = [([c1, c2], {chunk_key(c2.shard, c2.row_group): 5}), ([], {})]
    calls = []

    def refill():
        calls.append(1)
        return handed[len(calls) - 1]

    loader = DataLoader(tok, demo_data, 1, 64, chunks=[c0], refill=refill)
    with pytest.raises(StopIteration):
        while True:
            next(loader)
    assert len(calls) == 2  # once for more, once more to learn there is none
    assert loader.consumed() == {chunk_key(c.shard, c.row_group): c.rows for c in (c0, c1, c2)}
    assert loader.stats["docs"] == c0.rows + c1.rows + c2.rows - 5  # start_rows respected


def test_loop_over_epochs(tok, demo_data):
    c0 = chunk_table(demo_data)[0]
    loader = DataLoader(tok, demo_data, 4, 128, chunks=[c0], loop=True)
    for _ in range(20):
        next(loader)
    assert loader.epoch >= 1 and loader.consumed() == {chunk_key(c0.shard, c0.row_group): c0.rows}


def test_val_split_and_errors(tok, demo_data):
    val = DataLoader(tok, demo_data, 1, 32, split="val")
    assert (
        len({c.shard for c in val.chunks}) == 1
        and val.chunks[0].shard > chunk_table(demo_data)[-1].shard
    )
    with pytest.raises(DatasetError, match="does not read"):
        DataLoader(
            tok, demo_data, 1, 32, cursor={"epoch": 0, "shard": 99, "row_group": 0, "row": 0}
        )
    with pytest.raises(DatasetError, match="no chunks"):
        DataLoader(tok, demo_data, 1, 32, chunks=[chunk_table(demo_data)[0]], rank=1, world=2)


def test_an_unknown_packing_is_refused_in_the_config_and_the_loader(tok, demo_data):
    from nanochat.train import TrainConfig

    with pytest.raises(ValueError, match="packing must be one of"):
        TrainConfig(packing="tight")
    with pytest.raises(ValueError, match="packing must be one of"):
        DataLoader(tok, demo_data, 1, 32, packing="tight")
