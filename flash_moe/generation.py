"""Text generation with mlx-lm's conventions, plus the I/O figures of the expert stream."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Generator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import GenerationResponse as _MlxLmResponse
from mlx_lm.generate import stream_generate as _mlx_lm_stream_generate

from .io.reader import IOStats

Prompt = Union[str, Sequence[int], Sequence[Dict[str, str]], mx.array]


@dataclass
class GenerationResponse(_MlxLmResponse):
    """mlx-lm's ``GenerationResponse`` (text, token, logprobs, prompt_tps, generation_tps,
    peak_memory, finish_reason, ...) plus ``io``: the expert reads since the request began."""

    io: Optional[IOStats] = None
    prompt_io: Optional[IOStats] = None  # the reads of prompt processing alone


def prompt_tokens(tokenizer, prompt: Prompt) -> Union[str, List[int], mx.array]:
    """Chat messages go through the tokenizer's chat template; text and tokens pass as they are."""
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
    return prompt


def stream_generate(model: nn.Module, tokenizer, prompt: Prompt, max_tokens: int = 256,
                    **kwargs: Any) -> Generator[GenerationResponse, None, None]:
    """Yield one ``GenerationResponse`` per generated token (the last one has ``finish_reason``).

    ``prompt`` is a string, token ids, or a list of chat messages ({"role", "content"}).
    Other keyword arguments (``sampler``, ``logits_processors``, ``prefill_step_size``,
    ``max_kv_size``, ``kv_bits``, ``prompt_cache``, ...) go to ``mlx_lm.generate_step``.
    """
    if kwargs.get("max_kv_size") is not None and kwargs.get("prompt_cache") is None:
        # mlx-lm ignores max_kv_size for models that make their own caches, as these do
        kwargs["prompt_cache"] = model.make_cache(max_kv_size=kwargs.pop("max_kv_size"))
    reader = getattr(model, "expert_reader", None)
    start = reader.stats.copy() if reader else None
    prompt_io = None
    for response in _mlx_lm_stream_generate(model, tokenizer, prompt_tokens(tokenizer, prompt), max_tokens,
                                            **kwargs):
        io = reader.stats - start if reader else None
        if prompt_io is None:
            prompt_io = io
        yield GenerationResponse(**{f.name: getattr(response, f.name) for f in fields(_MlxLmResponse)},
                                 io=io, prompt_io=prompt_io)


def generate(model: nn.Module, tokenizer, prompt: Prompt, max_tokens: int = 256, verbose: bool = False,
             **kwargs: Any) -> str:
    """Generate a whole response and return its text; ``verbose`` prints it as it comes, then the
    speed and I/O figures."""
    text, response = "", None
    for response in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print(format_stats(response))
    return text


def format_stats(r: GenerationResponse) -> str:
    """A short report: speed, memory, and what the experts cost in reads."""
    lines = [f"Prompt: {r.prompt_tokens} tokens, {r.prompt_tps:.2f} tokens/s",
             f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.2f} tokens/s",
             f"Peak memory: {r.peak_memory:.3f} GB"]
    if r.io is not None:
        decode = r.io - r.prompt_io
        n = max(r.generation_tokens - 1, 1)  # the first token comes with the prompt's reads
        lines.append(f"Expert reads: prompt (+ first step) {r.prompt_io.reads} records / {r.prompt_io.bytes / 1e6:.1f} MB; "
                     f"decode {decode.reads / n:.1f} records / {decode.bytes / n / 1e6:.2f} MB per token, "
                     f"{decode.seconds / n * 1e3:.2f} ms I/O per token, cache hit rate {r.io.hit_rate:.0%}")
    return "\n".join(lines)
