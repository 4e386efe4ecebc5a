"""``flash-moe bench``: the streaming benchmark of issue 3 (``benchmarks/streaming.py``).

The benchmark lives in the repository's ``benchmarks/`` package (it builds multi-GB synthetic
models and is not part of the installed library); this module finds it next to the package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _benchmarks():
    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "streaming.py").exists():
        raise SystemExit("flash-moe bench: benchmarks/streaming.py not found; run it from a source checkout "
                         "of flash-moe (the benchmark is not shipped in the wheel).")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import streaming

    return streaming


def _run(args: argparse.Namespace) -> int:
    return _benchmarks().main(args)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the CLI's subparsers; its handler is ``args.func(args)``."""
    p = subparsers.add_parser("bench", help="streaming benchmark: disk ceiling, cold/warm decode vs resident "
                                            "mlx-lm, memory cap, prefill")
    try:
        _benchmarks().parser(p)
    except SystemExit:  # not a source checkout: the subcommand exists and explains itself
        pass
    p.set_defaults(func=_run)
    return p
