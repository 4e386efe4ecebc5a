"""The ``flash-moe`` command line: convert, generate, demo, verify, bench."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

from .errors import FlashMoeError


def _convert(args) -> None:
    from .conversion import convert

    out = convert(args.src, args.dst, bits=args.bits, group_size=args.group_size, resident_bits=args.resident_bits,
                  dtype=args.dtype, alignment=args.alignment, overwrite=args.overwrite, resume=args.resume)
    print(f"packed model written to {out}")


def _sampler(args):
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=args.temp, top_p=args.top_p)


def _run_generation(model, tokenizer, prompt, args) -> None:
    from .generation import format_stats, stream_generate

    t0, response, tokens = time.perf_counter(), None, []
    for response in stream_generate(model, tokenizer, prompt, args.max_tokens, sampler=_sampler(args),
                                    max_kv_size=getattr(args, "max_kv_size", None)):
        print(response.text, end="", flush=True)
        tokens.append(response.token)
    print()
    if response is None:
        return
    print("-" * 60)
    if getattr(args, "show_tokens", False):
        print(f"Token ids: {tokens}")
    print(format_stats(response))
    if getattr(args, "timing", True):
        total = time.perf_counter() - t0
        io = response.io
        print(f"Timing: {total:.2f} s total, {io.seconds:.2f} s waiting for expert reads, "
              f"{total - io.seconds:.2f} s everything else; {io.reads} records, {io.bytes / 1e6:.1f} MB read")


def _generate(args) -> None:
    from .loader import load

    model, tokenizer = load(args.model, args.experts_per_token, threads=args.threads,
                            cache_bytes=int(args.cache_gb * 1e9), direct=args.direct)
    prompt = [{"role": "user", "content": args.prompt}] if tokenizer.chat_template and not args.no_chat_template \
        else args.prompt
    _run_generation(model, tokenizer, prompt, args)


def _demo(args) -> None:
    from .conversion import convert
    from .loader import load
    from .tiny import make_tiny_checkpoint

    if args.dir is None:
        with tempfile.TemporaryDirectory(prefix="flash-moe-demo-") as tmp:
            args.dir = tmp
            return _demo(args)
    work = Path(args.dir)
    print("flash-moe demo: a tiny Qwen3.5-MoE with RANDOM weights (its text is noise); it shows the\n"
          "pipeline: Hugging Face checkpoint -> packed experts on disk -> generation streaming every\n"
          "expert from disk the moment the router picks it.")
    src = make_tiny_checkpoint(work / "hf", seed=args.seed, num_hidden_layers=8, num_experts=32,
                               num_experts_per_tok=4, hidden_size=256, moe_intermediate_size=256,
                               shared_expert_intermediate_size=256)
    print(f"1. checkpoint  {src}  (8 layers: 6 DeltaNet + 2 attention, 32 experts/layer, top-4)")
    dst = convert(src, work / "packed", bits=args.bits, progress=False, overwrite=True)
    layout_mb = sum(f.stat().st_size for f in (dst / "experts").iterdir()) / 1e6
    print(f"2. converted   {dst}  ({args.bits}-bit experts, {layout_mb:.1f} MB of packed records)")
    model, tokenizer = load(dst)
    print(f"3. generating  {args.max_tokens} tokens, experts read from disk per token:\n")
    prompt = [{"role": "user", "content": args.prompt}]
    args.timing = args.show_tokens = True
    _run_generation(model, tokenizer, prompt, args)


def _verify(args) -> None:
    from .verification import verify

    bad = verify(args.model)
    if bad:
        for file, layer, expert in bad:
            print(f"CORRUPT {file}: layer {layer}, expert {expert}")
        print(f"{len(bad)} corrupt record(s): re-convert the model.")
        sys.exit(1)
    print(f"{args.model}: every record matches its checksum.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flash-moe", description="Run MoE language models larger than memory by "
                                                             "streaming their experts from disk.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="pack a Hugging Face or mlx-lm checkpoint for streaming")
    c.add_argument("src", help="checkpoint directory or hub id")
    c.add_argument("dst", help="output directory")
    c.add_argument("--bits", type=int, choices=[2, 4, 8, 16], default=None,
                   help="expert bits (default 4; an mlx-lm quantized source keeps its own)")
    c.add_argument("--group-size", type=int, default=64)
    c.add_argument("--resident-bits", type=int, choices=[2, 4, 8, 16], default=None,
                   help="bits of the non-expert weights (default 4, or --bits when 8/16)")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    c.add_argument("--alignment", type=int, default=4096, help="record alignment in bytes (4096 or 16384)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing converted model")
    c.add_argument("--resume", action="store_true", help="continue an interrupted conversion")
    c.set_defaults(func=_convert)

    def sampling(q):
        q.add_argument("--prompt", default="Why is the sky blue?")
        q.add_argument("--max-tokens", type=int, default=32)
        q.add_argument("--temp", type=float, default=0.0)
        q.add_argument("--top-p", type=float, default=1.0)

    g = sub.add_parser("generate", help="generate text from a packed model")
    g.add_argument("--model", required=True, help="packed model directory (from `flash-moe convert`)")
    sampling(g)
    g.add_argument("--experts-per-token", type=int, default=None, help="route to K experts instead of the config's")
    g.add_argument("--threads", type=int, default=8, help="parallel expert reads")
    g.add_argument("--cache-gb", type=float, default=0.0, help="in-RAM expert cache (0: trust the page cache)")
    g.add_argument("--direct", action="store_true", help="bypass the page cache (O_DIRECT)")
    g.add_argument("--no-chat-template", action="store_true")
    g.add_argument("--max-kv-size", type=int, default=None,
                   help="keep attention to a window of this many tokens (a rotating KV cache)")
    g.add_argument("--timing", action="store_true", help="print where the time went")
    g.set_defaults(func=_generate)

    d = sub.add_parser("demo", help="build a tiny random model, convert it, and generate from disk")
    sampling(d)
    d.add_argument("--bits", type=int, choices=[2, 4, 8, 16], default=4)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--dir", default=None, help="work directory (default: a new temporary one)")
    d.set_defaults(func=_demo, max_tokens=24)

    v = sub.add_parser("verify", help="check every expert record's checksum")
    v.add_argument("model")
    v.set_defaults(func=_verify)

    from .bench import add_parser as add_bench_parser

    add_bench_parser(sub)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except FlashMoeError as exc:
        print(f"flash-moe: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
