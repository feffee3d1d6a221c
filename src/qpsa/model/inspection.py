"""What a GGUF file holds: architecture, sizes, and every tensor's type, bytes and bits per weight."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from qpsa.gguf.read import GGUFFile
from qpsa.model.config import SUPPORTED_ARCHITECTURES

_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass
class TensorRow:
    name: str
    shape: list[int]  # numpy order: rows first
    type: str
    bytes: int
    bits_per_weight: float
    layer: int | None


@dataclass
class LayerTotal:
    layer: int
    n_tensors: int
    n_weights: int
    bytes: int
    bits_per_weight: float
    types: dict[str, int]  # quant type -> number of weights in it


@dataclass
class ModelReport:
    path: str
    file_size: int
    sha256: str
    gguf_version: int
    architecture: str
    supported: bool
    name: str | None
    n_layer: int | None
    n_head: int | list | None
    n_head_kv: int | list | None
    n_embd: int | None
    n_ff: int | list | None
    vocab_size: int | None
    context_length: int | None
    n_weights: int
    bits_per_weight: float  # over all tensors
    tensors: list[TensorRow] = field(default_factory=list)
    layers: list[LayerTotal] = field(default_factory=list)
    experts: dict | None = None  # a mixture-of-experts model's expert counts and sizes (`expert_summary`)

    def to_dict(self) -> dict:
        return asdict(self)


def inspect_file(gguf_file: GGUFFile, layer: int | None = None) -> ModelReport:
    md = gguf_file.metadata
    arch = md.get("general.architecture", "?")

    def key(name):
        return md.get(f"{arch}.{name}")

    rows = []
    for t in gguf_file.tensors.values():
        m = _LAYER.match(t.name)
        rows.append(
            TensorRow(t.name, list(t.shape), t.qtype.name, int(t.raw.nbytes), round(t.bits_per_weight, 4),
                      int(m.group(1)) if m else None)
        )
    layers: dict[int, LayerTotal] = {}
    for r in rows:
        if r.layer is None:
            continue
        total = layers.setdefault(r.layer, LayerTotal(r.layer, 0, 0, 0, 0.0, {}))
        n = 1
        for d in r.shape:
            n *= d
        total.n_tensors += 1
        total.n_weights += n
        total.bytes += r.bytes
        total.types[r.type] = total.types.get(r.type, 0) + n
    for total in layers.values():
        total.bits_per_weight = round(8 * total.bytes / total.n_weights, 4)
    n_weights = sum(t.n_elements for t in gguf_file.tensors.values())
    n_bytes = sum(r.bytes for r in rows)
    experts = expert_summary(gguf_file, arch, n_weights)
    tokens = md.get("tokenizer.ggml.tokens")
    if layer is not None:
        rows = [r for r in rows if r.layer == layer]
    return ModelReport(
        path=str(gguf_file.path),
        file_size=gguf_file.size,
        sha256=gguf_file.sha256,
        gguf_version=gguf_file.layout.version,
        architecture=arch,
        supported=arch in SUPPORTED_ARCHITECTURES,
        name=md.get("general.name"),
        n_layer=key("block_count"),
        n_head=key("attention.head_count"),
        n_head_kv=key("attention.head_count_kv"),
        n_embd=key("embedding_length"),
        n_ff=key("feed_forward_length"),
        vocab_size=len(tokens) if tokens is not None else key("vocab_size"),
        context_length=key("context_length"),
        n_weights=n_weights,
        bits_per_weight=round(8 * n_bytes / max(n_weights, 1), 4),
        tensors=rows,
        layers=[layers[i] for i in sorted(layers) if layer is None or i == layer],
        experts=experts,
    )


def expert_summary(gguf_file: GGUFFile, arch: str, n_weights: int) -> dict | None:
    """Expert counts (from the metadata) and sizes (from the stacked ffn_*_exps tensors): one
    expert's weights and bytes per layer, all experts' share of the file's weights, and the
    weights one token goes through (everything but the experts it is not routed to)."""
    md = gguf_file.metadata
    exps = [t for t in gguf_file.tensors.values() if "_exps." in t.name and len(t.shape) == 3]
    count = md.get(f"{arch}.expert_count")
    if not exps and not count:
        return None
    used = md.get(f"{arch}.expert_used_count")
    used = used[0] if isinstance(used, list) and used else used
    per_layer: dict[int, dict] = {}
    for t in exps:
        m = _LAYER.match(t.name)
        layer = per_layer.setdefault(int(m.group(1)) if m else -1, {"weights": 0, "bytes": 0, "types": []})
        layer["weights"] += t.n_elements // t.shape[0]
        layer["bytes"] += int(t.raw.nbytes) // t.shape[0]
        layer["types"].append(t.qtype.name)
    n_expert = count or (exps[0].shape[0] if exps else 0)
    in_experts = sum(t.n_elements for t in exps)
    active = n_weights - in_experts + (in_experts * used // n_expert if used and n_expert else in_experts)
    return {"count": count, "used": used, "feed_forward_length": md.get(f"{arch}.expert_feed_forward_length"),
            "layers": len(per_layer), "share_of_weights": round(in_experts / max(n_weights, 1), 4),
            "active_weights_per_token": active,
            "per_expert": [{"layer": i, **v} for i, v in sorted(per_layer.items())]}
