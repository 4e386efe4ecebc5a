"""The public API and the command line, end to end on tiny models."""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
from mlx_lm.generate import stream_generate as mlx_lm_stream_generate
from mlx_lm.sample_utils import make_sampler

import flash_moe


def test_stream_generate_follows_mlx_lm_conventions(packed4):
    model, tokenizer = flash_moe.load(packed4)
    responses = list(flash_moe.stream_generate(model, tokenizer, [{"role": "user", "content": "hi"}],
                                               max_tokens=5, sampler=make_sampler(temp=0.0)))
    last = responses[-1]
    assert last.finish_reason in ("length", "stop") and last.generation_tokens == len(responses)
    assert last.generation_tps > 0 and last.prompt_tps > 0
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert last.prompt_tokens == len(chat)
    assert last.io.reads > 0 and last.io.bytes == last.io.reads * model.expert_reader.record_size
    assert 0 < last.prompt_io.reads <= last.io.reads
    # the same tokens through mlx-lm's own generator: the model follows its protocol
    ours = [r.token for r in responses]
    theirs = [r.token for r in mlx_lm_stream_generate(model, tokenizer, chat, max_tokens=5,
                                                      sampler=make_sampler(temp=0.0))]
    assert ours == theirs


def test_generate_returns_text_and_prints_figures(packed4, capsys):
    model, tokenizer = flash_moe.load(packed4)
    text = flash_moe.generate(model, tokenizer, "hello", max_tokens=6, verbose=True)
    out = capsys.readouterr().out
    assert text and text in out
    assert "Expert reads:" in out and "tokens/s" in out


def test_token_prompt_and_greedy_is_deterministic(packed16):
    model, tokenizer = flash_moe.load(packed16)
    a = [r.token for r in flash_moe.stream_generate(model, tokenizer, [5, 6, 7], max_tokens=6)]
    b = [r.token for r in flash_moe.stream_generate(model, tokenizer, mx.array([5, 6, 7]), max_tokens=6)]
    assert a == b and len(a) == 6


def run_cli(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "flash_moe", *args], capture_output=True, text=True,
                            timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_cli_convert_generate_verify(tmp_path, hf_checkpoint):
    dst = tmp_path / "packed"
    run_cli("convert", str(hf_checkpoint), str(dst), "--bits", "4")
    out = run_cli("generate", "--model", str(dst), "--prompt", "hello", "--max-tokens", "5",
                  "--experts-per-token", "1", "--timing", "--max-kv-size", "64").stdout
    assert "Generation: 5 tokens" in out and "Timing:" in out and "waiting for expert reads" in out
    assert "decode 4.0 records" in out  # 4 MoE layers x k=1
    assert "every record matches" in run_cli("verify", str(dst)).stdout
    again = run_cli("convert", str(hf_checkpoint), str(dst), check=False)
    assert again.returncode == 2 and "already holds a converted model" in again.stderr
    assert "Traceback" not in again.stderr
    missing = run_cli("generate", "--model", str(tmp_path / "nope"), check=False)
    assert missing.returncode == 2 and "no such directory" in missing.stderr


def test_cli_demo(tmp_path):
    out = run_cli("demo", "--max-tokens", "8", "--dir", str(tmp_path)).stdout
    assert "RANDOM weights" in out
    assert "Token ids: [" in out and "Generation: 8 tokens" in out
    assert "decode 32.0 records" in out  # 8 MoE layers x top-4, every one read from disk


def test_max_kv_size_keeps_a_window(packed4):
    """``max_kv_size`` reaches the model's own caches (mlx-lm would ignore it for a model with
    ``make_cache``): attention keeps a rotating window, and a window of 4 changes the tokens."""
    from mlx_lm.models.cache import RotatingKVCache

    model, tokenizer = flash_moe.load(packed4, resident_experts=True)
    caches = model.make_cache(max_kv_size=4)
    assert any(isinstance(c, RotatingKVCache) for c in caches)
    assert not any(isinstance(c, RotatingKVCache) for c in model.make_cache())

    def tokens(**kw):
        return [r.token for r in flash_moe.stream_generate(model, tokenizer, "a prompt of some length here",
                                                           max_tokens=16, sampler=make_sampler(temp=0.0), **kw)]
    assert tokens(max_kv_size=4) != tokens()
