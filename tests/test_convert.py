"""Conversion: input layouts, record format, manifest, atomicity, resume, memory-safe streaming."""

from __future__ import annotations

import errno
import filecmp
import json
import os
import shutil
import zlib
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model, quantize_model, save_model

import flash_moe
from flash_moe.errors import ConversionError, ModelFormatError
from flash_moe.io.format import load_manifest
from flash_moe.tiny import make_tiny_checkpoint


def expert_files_equal(a: Path, b: Path) -> bool:
    names = sorted(os.listdir(a / "experts"))
    return names == sorted(os.listdir(b / "experts")) and all(
        filecmp.cmp(a / "experts" / n, b / "experts" / n, shallow=False) for n in names)


def test_packed_layout(packed4):
    m = load_manifest(packed4)
    layout = m.layout
    assert m.model_type == "qwen3_5_moe" and m.num_experts == 8 and m.moe_layers == [0, 1, 2, 3]
    assert layout.bits == 4 and layout.group_size == 64 and layout.record_size % 4096 == 0
    names = [t.name for t in layout.tensors]
    assert names == [f"{p}.{part}" for p in ("gate", "up", "down") for part in ("weight", "scales", "biases")]
    assert layout.slot("gate.weight").shape == [64, 64 * 4 // 32]
    assert layout.slot("down.weight").shape == [64, 64 * 4 // 32]
    assert all(t.offset % 64 == 0 for t in layout.tensors)
    for entry in m.layers:
        data = (packed4 / entry.file).read_bytes()
        assert len(data) == m.num_experts * layout.record_size
        recs = [data[e * layout.record_size:(e + 1) * layout.record_size] for e in range(m.num_experts)]
        assert [zlib.crc32(r) for r in recs] == entry.checksums
    assert (packed4 / "tokenizer.json").exists() and (packed4 / "tokenizer_config.json").exists()
    # the vision tower and the MTP head are dropped, the rest keeps our names
    resident = mx.load(str(packed4 / m.resident_files[0]))
    assert not any("visual" in k or "mtp" in k for k in resident)
    assert "model.layers.3.self_attn.q_proj.scales" in resident
    assert resident["model.layers.0.mlp.gate.scales"].shape[-1] == 1  # router at 8 bits: 64 / 64 groups


def test_record_holds_the_expert_quantized_by_mlx(hf_checkpoint, packed4):
    """A record's bytes are exactly mx.quantize of that expert's source weights."""
    from safetensors.numpy import load_file

    src = load_file(str(hf_checkpoint / "model.safetensors"))
    gate_up = mx.array(src["model.language_model.layers.2.mlp.experts.gate_up_proj"][5])
    wq, scales, biases = mx.quantize(gate_up[64:], 64, 4)  # the "up" half
    m = load_manifest(packed4)
    data = np.fromfile(packed4 / m.entry(2).file, dtype=np.uint8)
    rec = data[5 * m.layout.record_size:6 * m.layout.record_size]
    slot = m.layout.slot("up.weight")
    np.testing.assert_array_equal(rec[slot.offset:slot.offset + slot.nbytes].view(np.uint32).reshape(slot.shape),
                                  np.array(wq))
    slot = m.layout.slot("up.biases")
    np.testing.assert_array_equal(rec[slot.offset:slot.offset + slot.nbytes].view(np.float32).reshape(slot.shape),
                                  np.array(biases))


def test_per_expert_and_sharded_layouts_give_the_same_records(tmp_path, packed4):
    src = make_tiny_checkpoint(tmp_path / "split", layout="per_expert", shard_bytes=40_000)
    assert len(list(src.glob("*.safetensors"))) > 3
    out = flash_moe.convert(src, tmp_path / "out", bits=4, progress=False)
    assert expert_files_equal(out, packed4)


def test_bits_2_and_8(tmp_path, hf_checkpoint):
    for bits in (2, 8):
        out = flash_moe.convert(hf_checkpoint, tmp_path / f"b{bits}", bits=bits, progress=False)
        m = load_manifest(out)
        assert m.layout.bits == bits and m.layout.slot("gate.weight").shape == [64, 64 * bits // 32]
        model, _ = flash_moe.load(out)
        assert np.isfinite(np.array(model(mx.array([[1, 2, 3]])))).all()


def test_mlx_lm_quantized_source_is_not_requantized(tmp_path, hf_checkpoint, packed4):
    model, config = load_model(hf_checkpoint)
    model, config = quantize_model(model, config, 64, 4, quant_predicate=model.quant_predicate)
    src = tmp_path / "mlx-4bit"
    save_model(src, model)
    (src / "config.json").write_text(json.dumps(config))
    shutil.copy(hf_checkpoint / "tokenizer.json", src)
    out = flash_moe.convert(src, tmp_path / "out", progress=False)
    assert load_manifest(out).source["quantized"]
    assert expert_files_equal(out, packed4)  # bytes taken as they are
    with pytest.raises(ConversionError, match="re-quantizing"):
        flash_moe.convert(src, tmp_path / "out2", bits=2, progress=False)


def test_destination_that_exists(tmp_path, hf_checkpoint, packed4):
    with pytest.raises(ConversionError, match="already holds a converted model.*--overwrite"):
        flash_moe.convert(hf_checkpoint, packed4, progress=False)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="exists"):
        flash_moe.convert(hf_checkpoint, other, progress=False)
    with pytest.raises(ConversionError, match="refusing to delete"):
        flash_moe.convert(hf_checkpoint, other, overwrite=True, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"
    again = flash_moe.convert(hf_checkpoint, tmp_path / "again", progress=False)
    flash_moe.convert(hf_checkpoint, again, overwrite=True, progress=False)
    assert expert_files_equal(again, packed4)


def _interrupt_after_layers(monkeypatch, n_layers: int):
    import flash_moe.conversion as conv

    real, calls = conv._write_layer, []

    def failing(*args, **kwargs):
        if len(calls) == n_layers:
            raise KeyboardInterrupt("simulated interruption")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "_write_layer", failing)
    return calls


def test_interrupted_conversion_never_loads_and_resumes(tmp_path, monkeypatch, hf_checkpoint, packed4):
    dst = tmp_path / "dst"
    _interrupt_after_layers(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        flash_moe.convert(hf_checkpoint, dst, bits=4, progress=False)
    monkeypatch.undo()
    assert not (dst / "manifest.json").exists()
    with pytest.raises(ModelFormatError, match="manifest.json: missing.*did not finish"):
        flash_moe.load(dst)
    with pytest.raises(ConversionError, match="unfinished conversion.*--resume"):
        flash_moe.convert(hf_checkpoint, dst, bits=4, progress=False)
    done_before = {p.name: p.stat().st_mtime_ns for p in (dst / "experts").glob("*.bin")}
    assert len(done_before) == 2
    flash_moe.convert(hf_checkpoint, dst, bits=4, resume=True, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (dst / "experts").glob("*.bin")
            if p.name in done_before} == done_before  # finished layers kept, not rewritten
    assert expert_files_equal(dst, packed4)
    flash_moe.load(dst)


def test_disk_full_is_a_clear_error_and_leaves_nothing_loadable(tmp_path, monkeypatch, hf_checkpoint):
    import flash_moe.conversion as conv

    real_pack = conv.pack_record
    count = []

    def full(*args):
        count.append(1)
        if len(count) > 10:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pack(*args)

    monkeypatch.setattr(conv, "pack_record", full)
    dst = tmp_path / "full"
    with pytest.raises(ConversionError, match="disk full.*--resume"):
        flash_moe.convert(hf_checkpoint, dst, bits=4, progress=False)
    assert not (dst / "manifest.json").exists()
    with pytest.raises(ModelFormatError):
        flash_moe.load(dst)


def test_not_enough_space_is_refused_up_front(tmp_path, monkeypatch, hf_checkpoint):
    import flash_moe.conversion as conv

    monkeypatch.setattr(conv.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(ConversionError, match="GB free"):
        flash_moe.convert(hf_checkpoint, tmp_path / "x", progress=False)


def test_conversion_streams_expert_slices(tmp_path, monkeypatch, hf_checkpoint):
    """No read of the fused expert tensors is larger than one expert's slice."""
    from flash_moe.io.checkpoint import CheckpointIndex

    real, sizes = CheckpointIndex.read, []

    def spy(self, name, index=None):
        out = real(self, name, index)
        if "experts" in name:
            sizes.append((index, out.nbytes))
        return out

    monkeypatch.setattr(CheckpointIndex, "read", spy)
    flash_moe.convert(hf_checkpoint, tmp_path / "s", progress=False)
    assert sizes and all(i is not None for i, _ in sizes)
    assert max(n for _, n in sizes) == 2 * 64 * 64 * 4  # one expert's gate_up slice, fp32
