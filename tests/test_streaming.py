"""The expert reader and the streaming MoE: what is read, how often, and bad files."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import flash_moe
from flash_moe.errors import CorruptRecordError, ModelFormatError, UnsupportedModelError
from flash_moe.io.format import load_manifest

from benchmarks.measure import ReadLog


@pytest.fixture
def copy_of(tmp_path):
    def make(src):
        dst = tmp_path / "model"
        shutil.copytree(src, dst)
        return dst
    return make


def spy_reads(model):
    """Record every (layer, experts) the reader is asked for (until the model is dropped)."""
    return ReadLog(model.expert_reader).__enter__().calls


def test_decode_reads_k_records_per_moe_layer(packed4):
    model, _ = flash_moe.load(packed4)
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=cache)
    before = model.expert_reader.stats.copy()
    calls = spy_reads(model)
    mx.eval(model(mx.array([[4]]), cache=cache))
    assert [layer for layer, _ in calls] == [0, 1, 2, 3]
    assert all(len(e) == 2 and len(set(e)) == 2 for _, e in calls)
    delta = model.expert_reader.stats - before
    assert delta.reads == 4 * 2
    assert delta.bytes == 4 * 2 * load_manifest(packed4).layout.record_size


def test_lower_k_reads_fewer_records(packed4):
    model, _ = flash_moe.load(packed4, experts_per_token=1)
    calls = spy_reads(model)
    mx.eval(model(mx.array([[4]])))
    assert all(len(e) == 1 for _, e in calls)


def test_prompt_reads_each_distinct_expert_once_per_layer(packed4):
    model, _ = flash_moe.load(packed4)
    calls = spy_reads(model)
    prompt = mx.array([list(range(3, 60))])
    mx.eval(model(prompt))
    assert [layer for layer, _ in calls] == [0, 1, 2, 3]  # one read batch per layer for the whole prompt
    for _, experts in calls:
        assert len(experts) == len(set(experts)) and experts == sorted(experts)
    # they are exactly the experts the router picked for the prompt's tokens
    stats = model.expert_reader.stats
    assert stats.reads == sum(len(e) for _, e in calls) and stats.reads <= 4 * 8


def test_prompt_reads_in_bounded_groups(packed16):
    """A byte budget below the prompt's needs: experts come in groups, each still read once
    per layer, and the result equals the one-batch computation."""
    record = load_manifest(packed16).layout.record_size
    prompt = mx.array([list(range(3, 60))])
    whole, _ = flash_moe.load(packed16)
    expected = whole(prompt)
    model, _ = flash_moe.load(packed16, max_read_bytes=3 * record)  # k=2: groups of 3
    calls = spy_reads(model)
    got = model(prompt)
    assert max(len(e) for _, e in calls) == 3 and len(calls) > 4  # several groups per layer
    for layer in range(4):
        experts = [e for l, group in calls if l == layer for e in group]
        assert len(experts) == len(set(experts)) == whole.expert_reader.stats.per_layer[layer][0]
    assert model.expert_reader.stats.reads == whole.expert_reader.stats.reads
    assert mx.abs(got - expected).max().item() < 1e-5


def test_ram_cache_serves_repeated_experts(packed4):
    model, _ = flash_moe.load(packed4, cache_bytes=64 << 20)
    mx.eval(model(mx.array([list(range(3, 60))])))
    first = model.expert_reader.stats.copy()
    mx.eval(model(mx.array([list(range(3, 60))])))
    again = model.expert_reader.stats - first
    assert again.reads == 0 and again.cache_hits == first.reads
    assert model.expert_reader.stats.hit_rate == pytest.approx(0.5)


def test_corrupt_record_is_caught_on_read_and_by_verify(packed4, copy_of):
    model_dir = copy_of(packed4)
    m = load_manifest(model_dir)
    path = model_dir / m.entry(1).file
    data = bytearray(path.read_bytes())
    for e in range(m.num_experts):  # flip one byte in every record of layer 1
        data[e * m.layout.record_size + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert sorted(flash_moe.verify(model_dir, progress=False)) == [(str(path), 1, e) for e in range(8)]
    model, _ = flash_moe.load(model_dir)
    with pytest.raises(CorruptRecordError, match=r"layer_001\.bin.*fails its checksum.*flash-moe verify"):
        mx.eval(model(mx.array([[1, 2, 3]])))
    assert flash_moe.verify(packed4, progress=False) == []


def test_truncated_expert_file(packed4, copy_of):
    model_dir = copy_of(packed4)
    path = model_dir / load_manifest(model_dir).entry(2).file
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 4096)
    with pytest.raises(ModelFormatError, match=r"layer_002\.bin.*truncated"):
        flash_moe.load(model_dir)


def test_missing_files(packed4, copy_of, hf_checkpoint, tmp_path):
    model_dir = copy_of(packed4)
    (model_dir / "experts" / "layer_003.bin").unlink()
    with pytest.raises(ModelFormatError, match=r"layer_003\.bin: expert file missing"):
        flash_moe.load(model_dir)
    (model_dir / "manifest.json").unlink()
    with pytest.raises(ModelFormatError, match="manifest.json: missing"):
        flash_moe.load(model_dir)
    with pytest.raises(ModelFormatError, match="Hugging Face checkpoint: convert it first"):
        flash_moe.load(hf_checkpoint)
    with pytest.raises(ModelFormatError, match="no such directory"):
        flash_moe.load(tmp_path / "nowhere")


def test_manifest_of_another_version(packed4, copy_of):
    model_dir = copy_of(packed4)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["version"] = 99
    (model_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelFormatError, match="version 99.*Re-convert"):
        flash_moe.load(model_dir)


def test_unsupported_model_type(tmp_path, hf_checkpoint):
    src = tmp_path / "llama"
    shutil.copytree(hf_checkpoint, src)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"config.json: model_type 'llama' is not supported"):
        flash_moe.convert(src, tmp_path / "out", progress=False)


def test_unreachable_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(flash_moe.ConversionError, match="no-such-org/no-such-model: cannot download"):
        flash_moe.convert("no-such-org/no-such-model", tmp_path / "out", progress=False)
    with pytest.raises(flash_moe.ConversionError, match="no such directory"):
        flash_moe.convert(tmp_path / "missing" / "dir", tmp_path / "out", progress=False)


def test_truncated_source_checkpoint(tmp_path, hf_checkpoint):
    src = tmp_path / "trunc"
    shutil.copytree(hf_checkpoint, src)
    f = src / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 2)
    with pytest.raises(flash_moe.ConversionError, match=r"model.safetensors: tensor .* truncated"):
        flash_moe.convert(src, tmp_path / "out", progress=False)


def test_read_error_names_the_file(packed4, monkeypatch):
    model, _ = flash_moe.load(packed4)

    def broken(fd, buffers, offset):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("flash_moe.io.reader.os.preadv", broken)
    with pytest.raises(ModelFormatError, match=r"layer_000\.bin: read error at byte .*Input/output error"):
        mx.eval(model(mx.array([[1]])))


def decode(model, steps: int = 5) -> mx.array:
    cache = model.make_cache()
    logits = [model(mx.array([[5, 17, 99, 200, 3, 44]]), cache=cache)[:, -1]]
    for _ in range(steps):
        logits.append(model(mx.argmax(logits[-1], axis=-1)[:, None], cache=cache)[:, -1])
    return mx.stack(logits)


@pytest.mark.parametrize("slots", [2, 3, 8 * 4])
def test_expert_cache_evicts_and_stays_exact(packed4, slots):
    """A cache from k slots (everything evicted all the time) up to every expert of every
    layer: the logits equal the resident model's bit for bit, and hits happen when they can."""
    ref_model, _ = flash_moe.load(packed4, resident_experts=True)
    ref = decode(ref_model)
    record = load_manifest(packed4).layout.record_size
    model, _ = flash_moe.load(packed4, cache_bytes=slots * record)
    out = decode(model)
    assert mx.array_equal(out, ref).item()
    stats = model.expert_reader.stats
    assert stats.reads > 0
    if slots == 32:  # holds the working set: a second pass reads nothing
        before = stats.copy()
        assert mx.array_equal(decode(model), ref).item()
        assert (model.expert_reader.stats - before).reads == 0


def test_failed_read_leaves_no_cache_entry(packed4, copy_of):
    model_dir = copy_of(packed4)
    m = load_manifest(model_dir)
    path = model_dir / m.entry(1).file
    data = bytearray(path.read_bytes())
    for e in range(m.num_experts):
        data[e * m.layout.record_size + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    model, _ = flash_moe.load(model_dir, cache_bytes=16 * m.layout.record_size)
    with pytest.raises(CorruptRecordError):
        mx.eval(model(mx.array([[1, 2, 3]])))
    source = model.expert_source
    assert not [key for key in source._slot_of if key[0] == 1]  # no slot claims a bad record
    with pytest.raises(CorruptRecordError):  # and it is not served from the cache later
        mx.eval(model(mx.array([[1, 2, 3]])))


def test_host_placement_is_a_no_op_off_cuda(packed4, recwarn):
    """Keeping read buffers on the host (and moving cache slots to the device) is a CUDA
    managed-memory matter: elsewhere nothing is advised, nothing warns, and the buffers work as
    any other."""
    from flash_moe.io import placement
    from flash_moe.io.records import RecordArrays

    if placement.on_cuda():
        pytest.skip("covered on the GPU by test_host_kept_read_buffers_see_every_write")
    dest = RecordArrays(load_manifest(packed4).layout, 2, on_host=True)
    assert dest.on_host is False
    assert placement.keep_on_host(dest.views) is False
    assert placement.move_to_device(dest.views, [0, 1]) is False
    assert not [w for w in recwarn if "flash-moe" in str(w.message)]


@pytest.mark.parametrize("direct", [False, True])
def test_reads_land_in_place(packed4, direct):
    """Scattered reads into per-tensor arrays give the same bytes as the record buffer."""
    from flash_moe.io.reader import ExpertReader
    from flash_moe.io.records import RecordArrays

    m = load_manifest(packed4)
    try:
        reader = ExpertReader(packed4, m, threads=4, direct=direct)
    except ModelFormatError:
        pytest.skip("this filesystem refuses O_DIRECT")
    whole = np.array(ExpertReader(packed4, m).read(2, [6, 1, 4]))
    dest = RecordArrays(m.layout, 5)
    reader.read(2, [6, 1, 4], into=dest.views, rows=[4, 0, 2])
    for slot, view in zip(m.layout.tensors, dest.views):
        got = view[[4, 0, 2]]
        assert np.array_equal(got, whole[:, slot.offset: slot.offset + slot.nbytes]), slot.name
    w = dest.weights()  # the MLX arrays see the same memory
    assert np.array_equal(np.array(w.gate.weight[4]).view(np.uint8).ravel(),
                          whole[0, m.layout.slot("gate.weight").offset:][: m.layout.slot("gate.weight").nbytes])


@pytest.mark.parametrize("threads", [6, 16])
def test_records_split_across_threads_land_whole(packed4, monkeypatch, threads):
    """Records cut into pieces that several threads read (pieces crossing tensor and padding
    boundaries) arrive byte-identical to whole-record reads."""
    from flash_moe.io import reader as reader_mod
    from flash_moe.io.records import RecordArrays

    monkeypatch.setattr(reader_mod, "MIN_STRIPE", 1000)  # tiny records: force many pieces
    m = load_manifest(packed4)
    whole = np.array(reader_mod.ExpertReader(packed4, m).read(1, [7, 0, 3]))
    reader = reader_mod.ExpertReader(packed4, m, threads=threads, check="never")
    pieces = []
    orig = reader._read_views
    monkeypatch.setattr(reader, "_read_views", lambda *a: (pieces.append(a), orig(*a)))
    dest = RecordArrays(m.layout, 3)
    pending = reader.submit(1, [7, 0, 3], dest.views)
    pending.wait([0])
    pending.finish()
    assert len(pieces) == 3 * -(-threads // 3)  # enough pieces to keep every thread busy
    for slot, view in zip(m.layout.tensors, dest.views):
        assert np.array_equal(view, whole[:, slot.offset: slot.offset + slot.nbytes]), slot.name
    assert reader.stats.reads == 3 and reader.stats.bytes == 3 * m.layout.record_size


def test_read_error_in_a_piece_surfaces_after_every_piece_stopped(packed4, monkeypatch):
    """A failing piece raises from ``wait`` with the file named, and only once no thread of the
    request still writes into the destination."""
    import threading
    import time

    from flash_moe.io import reader as reader_mod
    from flash_moe.io.records import RecordArrays

    monkeypatch.setattr(reader_mod, "MIN_STRIPE", 1000)
    m = load_manifest(packed4)
    reader = reader_mod.ExpertReader(packed4, m, threads=4, check="never")
    real, running = reader_mod.os.preadv, []

    def flaky(fd, buffers, offset):
        running.append(threading.get_ident())
        try:
            if offset >= m.layout.record_size * 5:  # the second record (expert 5) fails
                raise OSError(5, "Input/output error")
            time.sleep(0.01)
            return real(fd, buffers, offset)
        finally:
            running.remove(threading.get_ident())

    monkeypatch.setattr(reader_mod.os, "preadv", flaky)
    pending = reader.submit(0, [1, 5, 6], RecordArrays(m.layout, 3).views)
    with pytest.raises(ModelFormatError, match=r"layer_000\.bin: read error at byte"):
        pending.wait([0, 1, 2])
    assert running == []


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_experts_computed_as_they_land_match_all_at_once(packed4, chunks, monkeypatch):
    """Decode with each token's experts computed in groups as their records land (the default)
    gives the logits of computing them after every read, and of resident experts."""
    resident, _ = flash_moe.load(packed4, resident_experts=True)
    ref = decode(resident)
    model, _ = flash_moe.load(packed4)
    for block in model.moe_blocks():
        block.read_chunks, block.chunk_min_bytes = chunks, 0  # tiny records: force the groups
    calls = spy_reads(model)
    out = decode(model)
    assert mx.abs(out - ref).max().item() < 1e-5
    assert all(len(set(e)) == len(e) for _, e in calls)  # each expert read once per step

    blocks = len(model.moe_blocks())
    expected = [1, 1] * blocks if chunks > 1 else [2] * blocks  # k=2 experts per layer
    assert expert_groups_of_one_step(model, monkeypatch) == expected


def expert_groups_of_one_step(model, monkeypatch) -> list:
    """The number of (token, expert) pairs of each expert computation in one decode step."""
    from flash_moe.models import moe

    launches = []
    real = moe.kernels.expert_mlp
    monkeypatch.setattr(moe.kernels, "expert_mlp", lambda *a, **kw: (launches.append(a[2].size), real(*a, **kw))[1])
    cache = model.make_cache()
    mx.eval(model(mx.array([[5, 17]]), cache=cache))
    launches.clear()
    mx.eval(model(mx.array([[9]]), cache=cache))
    return launches


def test_small_reads_are_not_split_into_groups(packed4, monkeypatch):
    """Below chunk_min_bytes a step's experts run as one group (the groups' extra evaluations
    would cost more than the overlap saves)."""
    model, _ = flash_moe.load(packed4)
    assert expert_groups_of_one_step(model, monkeypatch) == [2] * len(model.moe_blocks())


def test_resident_experts_need_no_host_sync(packed4, monkeypatch):
    """With every expert in memory the MoE layer hands the router's indices to the kernels
    without learning them on the host (no per-layer sync), and reads nothing per token."""
    from flash_moe.models.moe import StreamingMoE

    model, _ = flash_moe.load(packed4, resident_experts=True)
    before = model.expert_reader.stats.copy()

    def no_sync(*args, **kwargs):
        raise AssertionError("the resident path went through the host-side routing")

    monkeypatch.setattr(StreamingMoE, "_routed_from_source", no_sync)
    out = decode(model, steps=2)
    assert not mx.isnan(out).any().item()
    assert (model.expert_reader.stats - before).reads == 0


def test_speculative_lookups_skip_the_host_sync_and_stay_exact(packed4, monkeypatch):
    """Once a decode step found every expert in the cache, the next steps look the slots up on the
    device (no host-side routing in any MoE layer, no reads) and give the resident logits bit for bit."""
    from flash_moe.models.moe import StreamingMoE

    ref_model, _ = flash_moe.load(packed4, resident_experts=True)
    ref = decode(ref_model)
    record = load_manifest(packed4).layout.record_size
    model, _ = flash_moe.load(packed4, cache_bytes=32 * record)  # every expert of every layer fits
    decode(model)  # fills the cache
    source = model.expert_source
    assert source.speculating
    host_routed = []
    real = StreamingMoE._routed_from_source
    monkeypatch.setattr(StreamingMoE, "_routed_from_source",
                        lambda self, *a: (host_routed.append(self.layer), real(self, *a))[1])
    before, failures, steps = model.expert_reader.stats.copy(), source.speculation_failures, source.speculative_steps
    assert mx.array_equal(decode(model), ref).item()
    delta = model.expert_reader.stats - before
    assert len(host_routed) == len(model.moe_blocks())  # the 6-token prompt only: decode steps skip it
    assert delta.reads == 0 and delta.cache_hits > 0
    assert source.speculation_failures == failures
    assert source.speculative_steps - steps == 5  # every decode step of the second pass


def test_cache_moves_exactly_the_slots_it_wrote_to_the_device(packed4, monkeypatch):
    """After a miss, the slots the records were read into, and only those, are handed to
    ``placement.move_to_device`` (a no-op here; on CUDA it moves them to GPU memory): every
    cached slot once, nothing for hits."""
    from flash_moe.io import placement

    moved = []
    monkeypatch.setattr(placement, "move_to_device", lambda views, rows: moved.extend(int(r) for r in rows))
    record = load_manifest(packed4).layout.record_size
    model, _ = flash_moe.load(packed4, cache_bytes=32 * record)  # every expert of every layer fits
    decode(model)
    source = model.expert_source
    assert sorted(moved) == sorted(source._slot_of.values()) and len(set(moved)) == len(moved) > 0
    moved.clear()
    decode(model)  # all hits
    assert moved == []


def test_failed_speculation_is_undone_and_rerun(packed4):
    """A speculative step that meets an expert not in the cache is undone (KV and recurrent
    states restored) and run again with reads: every logit still equals the resident model's."""
    ref_model, _ = flash_moe.load(packed4, resident_experts=True)
    ref = decode(ref_model)
    record = load_manifest(packed4).layout.record_size
    model, _ = flash_moe.load(packed4, cache_bytes=3 * record)  # far less than a step's experts
    source = model.expert_source
    cache = model.make_cache()
    logits = [model(mx.array([[5, 17, 99, 200, 3, 44]]), cache=cache)[:, -1]]
    for _ in range(5):
        source.speculating = True  # force the attempt
        logits.append(model(mx.argmax(logits[-1], axis=-1)[:, None], cache=cache)[:, -1])
    assert source.speculation_failures == 5
    assert mx.array_equal(mx.stack(logits), ref).item()


def test_cache_smaller_than_a_step_never_speculates(packed4):
    """With fewer slots than a layer's k experts every step reads past the cache: the model must
    not keep attempting (and undoing) speculative steps."""
    record = load_manifest(packed4).layout.record_size
    model, _ = flash_moe.load(packed4, cache_bytes=1 * record)  # k = 2
    decode(model)
    source = model.expert_source
    assert source.speculation_failures == 0 and not source.speculating


@pytest.fixture(scope="module")
def packed4_wide_heads(tmp_path_factory):
    """A tiny model whose attention heads (32) are wide enough for MLX's quantized KV cache."""
    from flash_moe.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("wide_heads")
    return flash_moe.convert(make_tiny_checkpoint(root / "hf", head_dim=32), root / "packed", bits=4, progress=False)


@pytest.mark.parametrize("kv", [{"max_kv_size": 8}, {"kv_bits": 4, "kv_group_size": 32, "quantized_kv_start": 0}],
                         ids=["rotating", "quantized"])
def test_speculation_with_rotating_and_quantized_kv_caches(packed4_wide_heads, kv):
    """Speculative steps, some undone for a miss, with mlx-lm's rotating (a window of 8 tokens)
    or quantized KV caches: the greedy tokens equal the resident model's with the same cache."""
    from mlx_lm.sample_utils import make_sampler

    def tokens(model):
        return [r.token for r in flash_moe.stream_generate(model, tokenizer, "a window of tokens", max_tokens=24,
                                                           sampler=make_sampler(temp=0.0), **kv)]

    ref_model, tokenizer = flash_moe.load(packed4_wide_heads, resident_experts=True)
    record = load_manifest(packed4_wide_heads).layout.record_size
    model, _ = flash_moe.load(packed4_wide_heads, cache_bytes=28 * record)  # most of the 32 experts
    assert tokens(model) == tokens(ref_model)
    source = model.expert_source
    assert source.speculative_steps >= 1 and source.speculation_failures >= 1
