"""Building the offline demo corpus and tokenizer a preset points at, when missing."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

from pilot.config.paths import REPO, curtail_home, prepared, resolve
from pilot.launch.errors import LaunchError
from pilot.launch.stack import child_env

# ----------------------------------------------------------------------------------------
# first use: demo corpus and tokenizer


def prepare_data(launch: dict[str, Any], allowed: bool, say: Callable[[str], None]) -> None:
    """Build the offline demo corpus and tokenizer the preset points at, if they are missing.

    Only the demo corpus is built here (it comes from text already on this machine); a real
    corpus such as FineWeb must be downloaded first, and the error says how."""
    for key in ("data_dir", "tokenizer_dir"):
        if not launch.get(key):
            raise LaunchError(f"the preset's [launch] table has no {key}: add one")
    data_dir = resolve(launch["data_dir"], curtail_home())
    tok_dir = resolve(launch["tokenizer_dir"], curtail_home())
    data_ok, tok_ok = prepared(data_dir, tok_dir)
    if data_ok and tok_ok:
        return
    demo = launch.get("corpus", "demo") == "demo"
    if not allowed or (not data_ok and not demo):
        what, where = ("corpus", data_dir) if not data_ok else ("tokenizer", tok_dir)
        how = (
            "run without --no-prepare once to build it"
            if demo
            else f"download it first: python -m nanochat.dataset download --num N --out {data_dir}"
        )
        raise LaunchError(f"{what} not built at {where}: {how}")
    env = child_env(None)
    if not data_ok:
        say(f"first use: building the offline demo corpus in {data_dir} ...")
        argv = [sys.executable, "-m", "nanochat.dataset", "demo", "--out", str(data_dir)]
        if "max_doc_chars" in launch:  # shorter documents crop less at short sequence lengths
            argv += ["--max-doc-chars", str(int(launch["max_doc_chars"]))]
        run_step(argv, env)
    if not tok_ok:
        vocab = int(launch.get("vocab_size", 8192))
        say(f"first use: training a {vocab}-token tokenizer into {tok_dir} ...")
        run_step(
            [
                sys.executable,
                "-m",
                "scripts.tok_train",
                "--data-dir",
                str(data_dir),
                "--out",
                str(tok_dir),
                "--vocab-size",
                str(vocab),
            ],
            env,
        )


def run_step(argv: list[str], env: dict[str, str]) -> None:
    """Run a preparation command in the foreground, its progress on our terminal."""
    rc = subprocess.run(argv, env=env, cwd=REPO).returncode
    if rc != 0:
        raise LaunchError(f"{' '.join(argv[1:4])} failed (exit {rc}): see its output above")
