"""Conversion of a Hugging Face or mlx-lm checkpoint into the packed streaming format.

It streams: resident tensors are read one at a time and written in shards, experts one
record at a time, so peak memory stays near one tensor (or one expert's slice of a fused
tensor), whatever the checkpoint's size. Each finished expert file is renamed into place
and noted in a small state file, so an interrupted conversion resumes layer by layer; the
manifest is written last and atomically, so an unfinished one never loads.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import zlib

from .errors import ConversionError
from .io.checkpoint import CheckpointIndex
from .io.format import EXPERTS_DIR, MANIFEST_NAME, ExpertLayout, LayerEntry, Manifest, write_json_atomic
from .io.records import mx_dtype_name, pack_record
from .models import architecture

STATE_DIR = ".convert-state"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "generation_config.json", "added_tokens.json", "qwen.tiktoken")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def resolve_source(src: str | os.PathLike) -> Path:
    """A local checkpoint directory, downloading a hub id with huggingface_hub if needed."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{path}: not a directory. Pass a checkpoint directory or a hub id.")
        return path
    src = str(src)
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise ConversionError(f"{src}: no such directory (and not a hub id like 'Qwen/Qwen3.5-397B-A17B').")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja",
                                                           "*.model", "*.tiktoken"]))
    except RepositoryNotFoundError as exc:
        raise ConversionError(f"{src}: no such repository on the hub (or it needs a token: "
                              "`huggingface-cli login`).") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ConversionError(f"{src}: cannot download from the hub ({type(exc).__name__}: {exc}). Check the "
                              "network, or download the checkpoint elsewhere and pass its directory.") from exc


def _expert_tensors(index: CheckpointIndex, prefix: str, e: int, num_experts: int) -> Dict[str, mx.array]:
    """One expert's gate/up/down from whichever layout the checkpoint uses.

    Returns float [out, in] weights, or (for mlx-lm quantized checkpoints) the packed
    weight/scales/biases of each projection.
    """
    fused = f"{prefix}.experts.gate_up_proj"
    if fused in index:  # transformers' fused layout: [E, 2I, H] (gate rows first) and [E, H, I]
        gate_up = index.read(fused, e)
        mid = gate_up.shape[0] // 2
        return {"gate.weight": gate_up[:mid], "up.weight": gate_up[mid:],
                "down.weight": index.read(f"{prefix}.experts.down_proj", e)}
    if f"{prefix}.experts.{e}.gate_proj.weight" in index:  # one tensor per expert
        return {f"{p}.weight": index.read(f"{prefix}.experts.{e}.{p}_proj.weight") for p in ("gate", "up", "down")}
    if f"{prefix}.switch_mlp.gate_proj.weight" in index:  # mlx-lm: stacked [E, ...] per projection
        out = {}
        for p in ("gate", "up", "down"):
            for part in ("weight", "scales", "biases"):
                name = f"{prefix}.switch_mlp.{p}_proj.{part}"
                if name in index:
                    out[f"{p}.{part}"] = index.read(name, e)
        return out
    raise ConversionError(f"{index.directory}: no expert weights found for {prefix} (expected "
                          f"{fused}, {prefix}.experts.{{e}}.gate_proj.weight or {prefix}.switch_mlp.*).")


def _expert_record(raw: Dict[str, mx.array], bits: int, group_size: int, dtype) -> Dict[str, mx.array]:
    if "gate.scales" in raw:  # already quantized: taken as it is
        return raw
    out = {}
    for p in ("gate", "up", "down"):
        w = raw[f"{p}.weight"]
        w = w.astype(dtype) if dtype is not None else w
        if bits >= 16:
            out[f"{p}.weight"] = w
        else:
            out[f"{p}.weight"], out[f"{p}.scales"], out[f"{p}.biases"] = mx.quantize(w, group_size, bits)
    return out


def _source_quantization(config: dict) -> Optional[dict]:
    q = config.get("quantization") or config.get("quantization_config")
    return q if q and "bits" in q and "group_size" in q else None


def _prepare_destination(dst: Path, overwrite: bool, resume: bool) -> None:
    if dst.exists() and any(dst.iterdir()):
        ours = (dst / MANIFEST_NAME).exists() or (dst / STATE_DIR).exists()
        if overwrite and ours:
            shutil.rmtree(dst)
        elif overwrite:
            raise ConversionError(f"{dst}: exists and is not a flash-moe model; refusing to delete it. "
                                  "Choose another destination.")
        elif (dst / MANIFEST_NAME).exists():
            raise ConversionError(f"{dst}: already holds a converted model. Pass --overwrite (overwrite=True) "
                                  "to replace it, or choose another destination.")
        elif not resume:
            what = "an unfinished conversion" if ours else "other files"
            raise ConversionError(f"{dst}: exists and holds {what}. Pass --resume to continue an unfinished "
                                  "conversion, --overwrite to start again, or choose another destination.")
    (dst / EXPERTS_DIR).mkdir(parents=True, exist_ok=True)
    (dst / STATE_DIR).mkdir(exist_ok=True)


def _disk_error(exc: OSError, path: Path) -> ConversionError:
    if exc.errno == errno.ENOSPC:
        return ConversionError(f"{path}: disk full. Free space on {path.parent} and run the same command "
                               "with --resume; the unfinished output does not load as a model.")
    return ConversionError(f"{path}: write failed ({exc.strerror}). The unfinished output does not load; "
                           "fix the cause and run again with --resume.")


def _quantizable(name: str, value: mx.array, group_size: int) -> bool:
    # Every 2-D ".weight" of these models is a Linear or an Embedding.
    return name.endswith(".weight") and value.ndim == 2 and value.shape[-1] % group_size == 0


def _write_resident(index: CheckpointIndex, names: List[Tuple[str, str]], dst: Path, arch, hf_layout: bool,
                    bits: int, group_size: int, dtype, quantized_source: bool, shard_bytes: int,
                    bar) -> Tuple[List[str], Optional[dict]]:
    """Stream resident tensors into safetensors shards; returns the files and the quantization map."""
    files, shard, size = [], {}, 0
    quant: Optional[dict] = None if bits >= 16 or quantized_source else {"group_size": group_size, "bits": bits,
                                                                          "mode": "affine"}

    def flush():
        nonlocal shard, size
        if not shard:
            return
        name = f"resident-{len(files) + 1:05d}.safetensors"
        tmp = dst / f".partial-{name}"  # mx.save_safetensors wants the suffix
        try:
            mx.save_safetensors(str(tmp), shard, metadata={"format": "mlx"})
            os.replace(tmp, dst / name)
        except OSError as exc:
            raise _disk_error(exc, dst / name) from exc
        files.append(name)
        shard, size = {}, 0

    for source_name, name in names:
        value = arch.sanitize(name, index.read(source_name), hf_layout)
        if dtype is not None and mx.issubdtype(value.dtype, mx.floating) and not name.endswith("A_log"):
            value = value.astype(dtype)
        override = arch.quant_predicate(name[: -len(".weight")]) if name.endswith(".weight") else None
        if quant is not None and _quantizable(name, value, group_size):
            q = override or {"group_size": group_size, "bits": bits}
            if override:
                quant[name[: -len(".weight")]] = dict(override)
            base = name[: -len(".weight")]
            shard[f"{base}.weight"], shard[f"{base}.scales"], shard[f"{base}.biases"] = mx.quantize(
                value, q["group_size"], q["bits"])
        else:
            shard[name] = value
        mx.eval(shard)
        size += index.nbytes(source_name)
        bar.update(index.nbytes(source_name))
        if size >= shard_bytes:
            flush()
    flush()
    return files, quant


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, bits: Optional[int] = None, group_size: int = 64,
            resident_bits: Optional[int] = None, dtype: Optional[str] = None, alignment: int = 4096,
            overwrite: bool = False, resume: bool = False, progress: bool = True,
            shard_bytes: int = 2 << 30) -> Path:
    """Convert ``src`` (checkpoint directory or hub id) into a packed streaming model at ``dst``.

    Args:
        bits: expert bits: 2, 4, 8, or 16 (unquantized). Default 4; for an mlx-lm quantized
            source, its own bits (its experts are copied without re-quantizing).
        group_size: quantization group size (32, 64 or 128).
        resident_bits: bits of the non-expert weights; default 4 for 2/4-bit experts, else ``bits``.
        dtype: cast float weights to "float32", "float16" or "bfloat16" first (default: keep).
        alignment: record alignment in bytes (4096 or 16384), for direct/uncached reads.
        overwrite: replace an existing converted model at ``dst``.
        resume: continue an interrupted conversion at ``dst`` (finished layers are kept).
        shard_bytes: size of each resident safetensors shard.
    Returns the destination directory.
    """
    from tqdm.auto import tqdm

    src_dir, dst = resolve_source(src), Path(dst).expanduser()
    config_path = src_dir / "config.json"
    if not config_path.exists():
        raise ConversionError(f"{config_path}: missing. A checkpoint directory needs its config.json.")
    config = json.loads(config_path.read_text())
    arch = architecture(config, str(config_path))
    text = arch.text_config(config)
    source_quant = _source_quantization(config)
    if source_quant:
        if bits is not None and bits != source_quant["bits"]:
            raise ConversionError(f"{config_path}: the checkpoint is already quantized to {source_quant['bits']} "
                                  f"bits; re-quantizing to {bits} is not supported. Convert the float "
                                  "checkpoint instead, or omit --bits.")
        bits, group_size = source_quant["bits"], source_quant["group_size"]
    bits = 4 if bits is None else bits
    if bits not in (2, 4, 8, 16):
        raise ConversionError(f"bits must be 2, 4, 8 or 16, not {bits}")
    if alignment % 4096:
        raise ConversionError(f"alignment must be a multiple of 4096, not {alignment}")
    if resident_bits is None:
        resident_bits = 4 if bits <= 4 else bits
    cast = DTYPES[dtype] if dtype else None

    index = CheckpointIndex(src_dir)
    num_experts = int(text["num_experts"])
    resident, moe_layers = [], set()
    for source_name in index:
        name = arch.rename(source_name)
        if name is None:
            continue
        m = arch.EXPERT_PATTERN.match(name)
        if m:
            moe_layers.add(int(m.group(1)))
        else:
            resident.append((source_name, name))
    # the source prefix of each layer's mlp, e.g. "model.language_model.layers.3.mlp"
    expert_layers = {layer: _source_prefix(index, layer) for layer in moe_layers}
    if not expert_layers:
        raise ConversionError(f"{src_dir}: no MoE expert tensors found; is this a {config['model_type']} checkpoint?")
    hf_layout = any(n.endswith("conv1d.weight") and index.shape(s)[-1] != 1 for s, n in resident)

    first = _expert_record(_expert_tensors(index, expert_layers[min(expert_layers)], 0, num_experts), bits,
                           group_size, cast)
    layout = ExpertLayout.build({k: v.shape for k, v in first.items()},
                                {k: mx_dtype_name(v) for k, v in first.items()},
                                bits=bits, group_size=group_size, alignment=alignment)
    expert_bytes = len(expert_layers) * num_experts * layout.record_size
    _prepare_destination(dst, overwrite, resume)
    free = shutil.disk_usage(dst).free
    if free < expert_bytes:
        raise ConversionError(f"{dst}: {free / 1e9:.1f} GB free, the expert files alone need "
                              f"{expert_bytes / 1e9:.1f} GB. Free space or choose another destination.")

    state = dst / STATE_DIR
    total = sum(index.nbytes(s) for s, _ in resident) + expert_bytes
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
        resident_state = state / "resident.json"
        if resident_state.exists():
            done = json.loads(resident_state.read_text())
            files, rquant = done["files"], done["quantization"]
            bar.update(sum(index.nbytes(s) for s, _ in resident))
        else:
            files, rquant = _write_resident(index, sorted(resident, key=lambda t: t[1]), dst, arch, hf_layout,
                                            resident_bits, group_size, cast, bool(source_quant), shard_bytes, bar)
            if source_quant:
                rquant = {k: v for k, v in source_quant.items()}
                for key in list(rquant):
                    if isinstance(rquant[key], dict):
                        renamed = arch.rename(key)
                        rquant.pop(key)
                        if renamed and not arch.EXPERT_PATTERN.match(renamed):
                            rquant[renamed] = source_quant[key]
            write_json_atomic(resident_state, {"files": files, "quantization": rquant})

        entries = []
        for layer in sorted(expert_layers):
            entries.append(_write_layer(index, expert_layers[layer], layer, num_experts, layout, bits, group_size,
                                        cast, dst, bar))

    for name in TOKENIZER_FILES + ("config.json",):
        if (src_dir / name).exists():
            shutil.copyfile(src_dir / name, dst / name)
    manifest = Manifest(model_type=config["model_type"], config=text, layout=layout, num_experts=num_experts,
                        layers=entries, resident_files=files, resident_quantization=rquant,
                        source={"path": str(src), "quantized": bool(source_quant)})
    write_json_atomic(dst / MANIFEST_NAME, manifest.to_dict())
    shutil.rmtree(state, ignore_errors=True)
    return dst


def _source_prefix(index: CheckpointIndex, layer: int) -> str:
    for prefix in ("model.language_model.", "language_model.model.", "model."):
        p = f"{prefix}layers.{layer}.mlp"
        if any(n.startswith(p + ".experts.") or n.startswith(p + ".switch_mlp.") for n in index):
            return p
    raise ConversionError(f"{index.directory}: cannot locate the experts of layer {layer}.")


def _write_layer(index: CheckpointIndex, prefix: str, layer: int, num_experts: int, layout: ExpertLayout,
                 bits: int, group_size: int, cast, dst: Path, bar) -> LayerEntry:
    """Write one layer's expert file (or keep it, when a previous run finished it)."""
    rel = f"{EXPERTS_DIR}/layer_{layer:03d}.bin"
    path, state = dst / rel, dst / STATE_DIR / f"layer_{layer:03d}.json"
    if state.exists() and path.exists() and path.stat().st_size == num_experts * layout.record_size:
        bar.update(num_experts * layout.record_size)
        return LayerEntry(layer, rel, json.loads(state.read_text())["checksums"])
    partial = path.with_suffix(".bin.partial")
    checksums = []
    try:
        with open(partial, "wb") as f:
            for e in range(num_experts):
                tensors = _expert_record(_expert_tensors(index, prefix, e, num_experts), bits, group_size, cast)
                mx.eval(tensors)
                record = pack_record(tensors, layout)
                checksums.append(zlib.crc32(record))
                f.write(record)
                bar.update(layout.record_size)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as exc:
        raise _disk_error(exc, path) from exc
    write_json_atomic(state, {"checksums": checksums})
    return LayerEntry(layer, rel, checksums)
