"""Embedding flash-moe in another program: load once, answer several requests, watch the I/O.

    python examples/embed.py [PACKED_MODEL_DIR]

Without an argument it builds the tiny random demo model first (its answers are noise).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from mlx_lm.sample_utils import make_sampler

import flash_moe
from flash_moe.tiny import make_tiny_checkpoint


def main() -> None:
    if len(sys.argv) > 1:
        model_dir = Path(sys.argv[1])
    else:
        work = Path(tempfile.mkdtemp(prefix="flash-moe-example-"))
        model_dir = flash_moe.convert(make_tiny_checkpoint(work / "hf"), work / "packed", bits=4, progress=False)

    # Route to fewer experts than the config asks for: fewer bytes read per token.
    model, tokenizer = flash_moe.load(model_dir, experts_per_token=1, cache_bytes=256 << 20)
    sampler = make_sampler(temp=0.7, top_p=0.9)

    for question in ["What is a mixture of experts?", "Name three prime numbers."]:
        messages = [{"role": "user", "content": question}]
        text, last = "", None
        for last in flash_moe.stream_generate(model, tokenizer, messages, max_tokens=16, sampler=sampler):
            text += last.text
        io = last.io
        print(f"Q: {question}\nA: {text!r}\n   {last.generation_tps:.1f} tok/s, {io.reads} records read "
              f"({io.bytes / 1e6:.2f} MB), RAM-cache hit rate {io.hit_rate:.0%}\n")


if __name__ == "__main__":
    main()
