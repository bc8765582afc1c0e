"""Benchmark: rustbpe vs. Hugging Face `tokenizers` BPE training, same corpus, same run.

Trains a byte-level BPE vocabulary (default 8192 tokens, nanochat's split pattern for both)
on >= 10 MB of English text and reports wall-clock training time and compression (UTF-8 bytes
per token on held-out text, higher is better) for each, as ratios:

    speed_ratio       = hf_s / ours_s            (> 1: ours trains faster)
    compression_ratio = ours_bytes_per_token / hf_bytes_per_token   (>= 0.995: within 0.5%)

Corpus (offline): the reStructuredText sources of the Python documentation
(`apt-get install python3.11-doc`, ~11 MB under /usr/share/doc/python3.11/html/_sources),
every 15th document held out; topped up with standard-library docstrings when short of
--train-mb (default 10). The last line is `key=value` pairs for scripts.

    .venv/bin/python bench/tokenizer_train.py [--vocab-size 8192] [--repeats 3]
        [--other-rustbpe DIR]   # also time e.g. nanochat's rustbpe wheel, unpacked in DIR
"""

import argparse
import ast
import functools
import importlib
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import tiktoken

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
# nanochat's split pattern (rustbpe's default), given to HF tokenizers too.
NANOCHAT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


def paragraphs(text):
    return [p for p in text.split("\n\n") if p.strip()]


def stdlib_docstrings():
    """Docstrings of the standard library's modules, classes and functions: English prose."""
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc


def documents():
    if DOCS.is_dir():
        for path in sorted(DOCS.rglob("*.txt")):
            yield path.read_text(encoding="utf-8", errors="replace")
    yield from stdlib_docstrings()


def load_corpus(train_bytes):
    """(train paragraphs, held-out paragraphs): every 15th document held out, the rest
    trained on until `train_bytes`. Deterministic (sorted files)."""
    train, heldout, size = [], [], 0
    for i, doc in enumerate(documents()):
        if i % 15 == 0:
            heldout.extend(paragraphs(doc))
        elif size < train_bytes:
            train.extend(paragraphs(doc))
            size += sum(len(p.encode()) for p in paragraphs(doc))
        else:
            break
    return train, heldout


def train_rustbpe(module, texts, vocab_size):
    start = time.perf_counter()
    tokenizer = module.Tokenizer()
    tokenizer.train_from_iterator(iter(texts), vocab_size)
    seconds = time.perf_counter() - start
    encoding = tiktoken.Encoding(
        name="rustbpe-bench",
        pat_str=tokenizer.get_pattern(),
        mergeable_ranks={bytes(token): rank for token, rank in tokenizer.get_mergeable_ranks()},
        special_tokens={},
    )
    return seconds, lambda batch: [len(ids) for ids in encoding.encode_ordinary_batch(batch)]


def train_hf(texts, vocab_size):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    start = time.perf_counter()
    tokenizer = Tokenizer(models.BPE())
    # Same pre-split as ours, then the byte-level alphabet (256 symbols), no extra regex.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(NANOCHAT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=0,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(iter(texts), trainer=trainer, length=len(texts))
    seconds = time.perf_counter() - start
    return seconds, lambda batch: [len(e.ids) for e in tokenizer.encode_batch(batch)]


def measure(train_fn, train, heldout, vocab_size, repeats):
    """(best training seconds of `repeats`, held-out bytes per token)."""
    runs = [train_fn(train, vocab_size) for _ in range(repeats)]
    count_tokens = runs[-1][1]
    n_bytes = sum(len(t.encode()) for t in heldout)
    return min(s for s, _ in runs), n_bytes / sum(count_tokens(heldout))


def measure_in_child(module_dir, args):
    """Another module with the rustbpe API (e.g. nanochat's PyPI wheel unpacked into a
    directory) shares our module's name, so it runs in a child process."""
    command = [sys.executable, __file__, "--child-rustbpe", str(module_dir)]
    command += ["--vocab-size", str(args.vocab_size), "--train-mb", str(args.train_mb)]
    command += ["--repeats", str(args.repeats)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return tuple(json.loads(out.splitlines()[-1]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--train-mb", type=float, default=10.0, help="minimum training text")
    parser.add_argument("--repeats", type=int, default=1, help="best of N timings each")
    parser.add_argument(
        "--other-rustbpe",
        type=Path,
        help="also time another rustbpe-API build from this directory, e.g. nanochat's: "
        "pip download rustbpe==0.1.0 --no-deps; python -m zipfile -e rustbpe-*.whl DIR",
    )
    parser.add_argument("--child-rustbpe", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    train, heldout = load_corpus(int(args.train_mb * 1e6))
    if args.child_rustbpe:
        sys.path.insert(0, str(args.child_rustbpe))
        module = importlib.import_module("rustbpe")
        fn = functools.partial(train_rustbpe, module)
        print(json.dumps(measure(fn, train, heldout, args.vocab_size, args.repeats)))
        return

    train_mb = sum(len(p.encode()) for p in train) / 1e6
    heldout_mb = sum(len(p.encode()) for p in heldout) / 1e6
    print(
        f"corpus: train {train_mb:.2f} MB ({len(train)} paragraphs), held-out {heldout_mb:.2f} MB"
    )
    if train_mb < args.train_mb:
        sys.exit(f"only {train_mb:.2f} MB of training text found (want {args.train_mb})")

    ours = functools.partial(train_rustbpe, importlib.import_module("rustbpe"))
    results = {
        "ours": measure(ours, train, heldout, args.vocab_size, args.repeats),
        "hf": measure(train_hf, train, heldout, args.vocab_size, args.repeats),
    }
    if args.other_rustbpe:
        results["other"] = measure_in_child(args.other_rustbpe, args)
    for name, (seconds, bpt) in results.items():
        print(f"{name:>5}: train {seconds:7.2f} s   held-out {bpt:.4f} bytes/token")

    (ours_s, ours_bpt), (hf_s, hf_bpt) = results["ours"], results["hf"]
    print(
        f"ours vs HF tokenizers: {hf_s / ours_s:.2f}x as fast, compression ratio {ours_bpt / hf_bpt:.4f}"
    )
    pairs = {
        "vocab_size": args.vocab_size,
        "train_mb": f"{train_mb:.2f}",
        "ours_s": f"{ours_s:.3f}",
        "hf_s": f"{hf_s:.3f}",
        "speed_ratio": f"{hf_s / ours_s:.3f}",
        "ours_bytes_per_token": f"{ours_bpt:.4f}",
        "hf_bytes_per_token": f"{hf_bpt:.4f}",
        "compression_ratio": f"{ours_bpt / hf_bpt:.4f}",
    }
    if "other" in results:
        other_s, other_bpt = results["other"]
        print(f"ours vs other rustbpe: {other_s / ours_s:.2f}x as fast")
        pairs |= {
            "other_s": f"{other_s:.3f}",
            "other_speed_ratio": f"{other_s / ours_s:.3f}",
            "other_bytes_per_token": f"{other_bpt:.4f}",
        }
    print(" ".join(f"{key}={value}" for key, value in pairs.items()))


if __name__ == "__main__":
    main()
