"""Parquet text shards: the on-disk corpus format, and the CLI that builds or downloads it.

A data dir holds shard_NNNNN.parquet files with one string column `text`, each split into
several row groups. Row groups are the unit of data accounting ("chunks"): the data ledger
assigns and commits them, the loader reads one at a time. The LAST shard is validation.

    python -m nanochat.dataset from-text PATH... --out DIR     local .txt/.md/.rst files or folders
    python -m nanochat.dataset demo --out DIR                  offline corpus from Python's docs
    python -m nanochat.dataset download --num N --out DIR      FineWeb-EDU shards over HTTP
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import pkgutil
import random
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.paths import atomic_write, resolve

SHARD_RE = re.compile(r"^shard_(\d{5})\.parquet$")
# nanochat's pre-shuffled FineWeb-EDU (100B tokens in 1823 shards of ~100 MB, text column).
FINEWEB_BASE_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


class DatasetError(ValueError):
    pass


class Chunk(NamedTuple):
    shard: int
    row_group: int
    rows: int


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def list_shards(data_dir: str | Path) -> list[Path]:
    """All shards of data_dir in order; the last one is the validation shard."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DatasetError(
            f"data dir {d} does not exist: build one with `python -m nanochat.dataset demo --out {d}`"
        )
    shards = sorted(p for p in d.iterdir() if SHARD_RE.match(p.name))
    if len(shards) < 2:
        raise DatasetError(
            f"data dir {d} has {len(shards)} shard(s): need at least 2 (training + the last for validation)"
        )
    return shards


def shard_index(path: Path) -> int:
    return int(SHARD_RE.match(path.name).group(1))


def open_shard(path: Path) -> pq.ParquetFile:
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(
            f"{path}: not a readable parquet file ({e}); delete and rebuild it"
        ) from e
    if "text" not in pf.schema_arrow.names:
        raise DatasetError(f"{path}: no `text` column (columns: {pf.schema_arrow.names})")
    return pf


def chunk_table(data_dir: str | Path) -> list[Chunk]:
    """Every row group of the training shards (all but the last), in order."""
    chunks = []
    for path in list_shards(data_dir)[:-1]:
        meta = open_shard(path).metadata
        shard = shard_index(path)
        chunks.extend(
            Chunk(shard, rg, meta.row_group(rg).num_rows) for rg in range(meta.num_row_groups)
        )
    return chunks


def val_chunks(data_dir: str | Path) -> list[Chunk]:
    path = list_shards(data_dir)[-1]
    meta = open_shard(path).metadata
    return [
        Chunk(shard_index(path), rg, meta.row_group(rg).num_rows)
        for rg in range(meta.num_row_groups)
    ]


def read_row_group(data_dir: str | Path, shard: int, row_group: int) -> list[str]:
    path = Path(data_dir) / shard_name(shard)
    if not path.is_file():
        raise DatasetError(f"missing shard {path}")
    try:
        table = open_shard(path).read_row_group(row_group, columns=["text"])
    except (OSError, pa.ArrowException) as e:
        raise DatasetError(
            f"{path}: row group {row_group} is unreadable ({e}); rebuild the shard"
        ) from e
    return table.column("text").to_pylist()


# ---------------------------------------------------------------------------- writing shards


def split_document(text: str, max_chars: int) -> list[str]:
    """Cut a long text at paragraph boundaries into pieces of at most ~max_chars, so a corpus
    of big files still gives documents of web-page size (packing crops long documents)."""
    pieces, current = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if current and len(current) + len(para) + 2 > max_chars:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        pieces.append(current)
    return pieces


def write_shards(
    docs: Iterable[str],
    out_dir: str | Path,
    shard_docs: int = 160,
    row_group_size: int = 32,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> list[Path]:
    """Shuffle docs (fixed seed) and write training shards plus a final validation shard."""
    docs = [d for d in docs if d.strip()]
    if len(docs) < 2:
        raise DatasetError(f"need at least 2 non-empty documents, got {len(docs)}")
    random.Random(seed).shuffle(docs)
    n_val = max(1, round(len(docs) * val_fraction))
    train, val = docs[:-n_val], docs[-n_val:]
    groups = [train[i : i + shard_docs] for i in range(0, len(train), shard_docs)] + [val]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("shard_*.parquet"):  # a rebuilt corpus must not mix with an old one
        stale.unlink()
    paths = []
    for i, group in enumerate(groups):
        path = out / shard_name(i)
        table = pa.table({"text": group})
        atomic_write(path, lambda f, t=table: pq.write_table(t, f, row_group_size=row_group_size))
        paths.append(path)
    return paths


def texts_from_paths(paths: Iterable[str | Path], max_doc_chars: int = 4000) -> list[str]:
    """Documents from text files and folders (recursively: .txt .md .rst .text)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(
                sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            )
        elif p.is_file():
            files.append(p)
        else:
            raise DatasetError(f"{p}: no such file or folder")
    docs = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        docs.extend(split_document(text, max_doc_chars))
    if not docs:
        raise DatasetError(f"no text found in {[str(p) for p in paths]}")
    return docs


# Modules whose import has side effects (GUI, browser, printing) or that are test suites.
DEMO_SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "test",
    "lib2to3",
    "ensurepip",
    "venv",
    "pydoc_data",
    "tests",
}


def _demo_modules() -> list[str]:
    """Importable stdlib modules and their submodules, sorted (call with warnings silenced)."""
    names = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in DEMO_SKIP:
            continue
        try:
            mod = importlib.import_module(name)
        except Exception:  # platform-specific modules (winreg, msvcrt, ...)
            continue
        names.append(name)
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), name + "."):
            if any(part.startswith("_") or part in DEMO_SKIP for part in info.name.split(".")):
                continue
            try:
                importlib.import_module(info.name)
            except Exception:
                continue
            names.append(info.name)
    return names


def _module_docs(name: str) -> list[str]:
    """The docstrings a module defines itself: module, public classes/functions, methods."""
    mod = sys.modules[name]
    docs = [mod.__doc__]
    for key, obj in sorted(vars(mod).items()):
        if key.startswith("_") or getattr(obj, "__module__", None) != name:
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            docs.append(obj.__doc__)
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and (
                    inspect.isroutine(member) or isinstance(member, property)
                ):
                    docs.append(getattr(member, "__doc__", None))
    return [inspect.cleandoc(d) for d in docs if isinstance(d, str) and d.strip()]


def demo_texts(max_doc_chars: int = 4000) -> list[str]:
    """~1.7 MB of English from Python's own documentation, fully offline and deterministic for
    a given Python: the language reference topics behind help() (pydoc_data.topics), then each
    stdlib module's docstrings as one document per module."""
    from pydoc_data.topics import topics

    docs = []
    for key in sorted(topics):
        docs.extend(split_document(topics[key], max_doc_chars))
    seen: set[str] = set()  # re-exported objects share docstrings
    with warnings.catch_warnings():  # touching deprecated aliases (typing.io) warns
        warnings.simplefilter("ignore")
        for name in _demo_modules():
            parts = [d for d in _module_docs(name) if d not in seen and not seen.add(d)]
            if parts:
                text = f"Module {name}\n\n" + "\n\n".join(parts)
                docs.extend(split_document(text, max_doc_chars))
    return docs


# ---------------------------------------------------------------------------- download


def download_file(
    url: str, dest: Path, retries: int = 5, timeout: float = 60.0, backoff: float = 1.0
) -> Path:
    """Fetch url to dest: bytes go to dest.part, a retry resumes it with an HTTP Range request,
    and only a complete, readable parquet file is renamed (atomically) to dest."""
    if dest.exists():
        return dest
    part = dest.with_name(dest.name + ".part")
    last_error: Exception | None = None
    for attempt in range(retries):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "curtail-llm", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=timeout
            ) as resp:
                # 206 continues the part file; 200 means the server ignored Range: start over.
                resumed = have and resp.status == 206
                length = resp.headers.get("Content-Length")
                expected = (have if resumed else 0) + int(length) if length is not None else None
                with open(part, "ab" if resumed else "wb") as f:
                    shutil.copyfileobj(resp, f, length=1 << 20)
            # http.client returns short reads silently when a connection drops mid-body: keep
            # what arrived and resume it on the next attempt.
            if expected is not None and part.stat().st_size < expected:
                last_error = OSError(
                    f"connection closed after {part.stat().st_size} of {expected} bytes"
                )
                continue
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # nothing left to fetch: the part file is complete
                pass
            elif 400 <= e.code < 500 and e.code not in (408, 429):
                raise DatasetError(f"{url}: HTTP {e.code} {e.reason}") from e
            else:
                last_error = e
                continue
        except (urllib.error.URLError, OSError) as e:  # includes IncompleteRead, timeouts
            last_error = e
            continue
        try:
            pq.ParquetFile(part)
        except (OSError, pa.ArrowException) as e:
            part.unlink()  # complete but corrupt: a resume would only append to garbage
            last_error = e
            continue
        os.replace(part, dest)
        return dest
    raise DatasetError(f"{url}: download failed after {retries} attempts ({last_error})")


def download(
    num: int, out_dir: str | Path, base_url: str = FINEWEB_BASE_URL, workers: int = 4, **kwargs
) -> list[Path]:
    """Download shards 0..num-1 (the last one serves as validation) in parallel."""
    if num < 2:
        raise DatasetError(f"--num {num}: need at least 2 shards (training + validation)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = base_url.rstrip("/")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(download_file, f"{base}/{shard_name(i)}", out / shard_name(i), **kwargs)
            for i in range(num)
        ]
        return [f.result() for f in futures]


# ---------------------------------------------------------------------------- CLI


def summarize(data_dir: str | Path) -> str:
    shards = list_shards(data_dir)
    chunks = chunk_table(data_dir)
    val = val_chunks(data_dir)
    size = sum(p.stat().st_size for p in shards)
    return (
        f"{data_dir}: {len(shards) - 1} training shards ({len(chunks)} row groups, "
        f"{sum(c.rows for c in chunks)} docs) + validation {shards[-1].name} "
        f"({sum(c.rows for c in val)} docs), {size / 1e6:.1f} MB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanochat.dataset", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_text = sub.add_parser("from-text", help="shards from local text files or folders")
    p_text.add_argument("paths", nargs="+")
    p_demo = sub.add_parser("demo", help="offline demo corpus from Python's bundled docs")
    p_dl = sub.add_parser("download", help="FineWeb-EDU shards over HTTP (retries, resume)")
    p_dl.add_argument(
        "--num", type=int, required=True, help="number of shards; the last is validation"
    )
    p_dl.add_argument("--base-url", default=FINEWEB_BASE_URL)
    p_dl.add_argument("--workers", type=int, default=4)
    p_dl.add_argument("--retries", type=int, default=5)
    for p in (p_text, p_demo):
        p.add_argument("--shard-docs", type=int, default=160, help="documents per training shard")
        p.add_argument(
            "--row-group-size", type=int, default=32, help="documents per row group (chunk)"
        )
        p.add_argument("--max-doc-chars", type=int, default=4000)
    for p in (p_text, p_demo, p_dl):
        p.add_argument(
            "--out",
            required=True,
            help="data dir to write shards into (relative: under $CURTAIL_HOME)",
        )
    args = parser.parse_args(argv)
    args.out = resolve(args.out)  # like every other CLI here: relative paths live in $CURTAIL_HOME
    try:
        if args.cmd == "download":
            download(args.num, args.out, args.base_url, workers=args.workers, retries=args.retries)
        else:
            if args.cmd == "demo":
                docs = demo_texts(args.max_doc_chars)
            else:
                docs = texts_from_paths(args.paths, args.max_doc_chars)
            write_shards(docs, args.out, args.shard_docs, args.row_group_size)
        print(summarize(args.out))
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
