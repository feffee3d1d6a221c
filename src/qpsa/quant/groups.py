"""Which tensors `sensitivity` and `plan` requantize together: the groups of each granularity."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from qpsa.quant.requantize import is_quantizable

_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass
class QuantGroup:
    """Tensors requantized together: one layer's weights, one tensor, the embedding/head, an MoE
    layer's experts or its other weights, or one expert (its slice of each expert tensor)."""

    name: str  # "layer 3", "blk.3.ffn_down.weight", "token_embd.weight", "layer 3 experts", "layer 3 expert 5"
    tensors: list[str]
    first_layer: int  # the first layer whose output changes (0 for the embedding, L for a separate head)
    expert: int | None = None  # only this expert's slice of each (stacked expert) tensor

    def to_dict(self) -> dict:
        return asdict(self)


GRANULARITIES = ("layer", "tensor", "experts", "expert")


def quant_groups(loaded, granularity: str = "layer") -> list[QuantGroup]:
    """The quantizable tensors of a model in groups, in forward order, by granularity:

    * layer: each layer's weights together; tensor: one tensor at a time;
    * experts (MoE models): each layer's experts together (its ffn_{gate,up,down}_exps), and
      apart from them the rest of the layer ("layer i attention");
    * expert (MoE models): one expert of one layer at a time (its slices of the three expert
      tensors), and nothing else: a measurement of which experts matter, not a partition a GGUF
      can store (a tensor has one type, so `plan` takes `experts`).

    The embedding and a separate output head are groups of their own at every granularity but
    `expert`."""
    from qpsa.errors import QpsaError

    if granularity not in GRANULARITIES:
        raise QpsaError(f"--granularity must be one of {', '.join(GRANULARITIES)} (got {granularity!r})")
    n_expert = loaded.config.n_expert
    if granularity.startswith("expert") and not n_expert:
        raise QpsaError(f"--granularity {granularity} needs a mixture-of-experts model; "
                        f"{loaded.path.name} ({loaded.config.arch}) has no experts (use layer or tensor)")
    n_layer = loaded.config.n_layer
    by_layer: dict[int, list[str]] = {}
    embedding, head = [], []
    for name, t in loaded.file.tensors.items():
        if not is_quantizable(name, t.shape):
            continue
        m = _LAYER.match(name)
        if m:
            by_layer.setdefault(int(m.group(1)), []).append(name)
        elif name == "output.weight":
            head.append(name)
        else:
            embedding.append(name)
    if granularity == "expert":
        groups = []
        for i in sorted(by_layer):
            names = [n for n in sorted(by_layer[i], key=_tensor_order) if "_exps." in n]
            groups += [QuantGroup(f"layer {i} expert {e}", names, i, e) for e in range(n_expert) if names]
        return groups
    groups = [QuantGroup(name, [name], 0) for name in embedding]
    for i in sorted(by_layer):
        names = sorted(by_layer[i], key=_tensor_order)
        if granularity == "layer":
            groups.append(QuantGroup(f"layer {i}", names, i))
        elif granularity == "experts":
            rest = [n for n in names if "_exps." not in n]
            experts = [n for n in names if "_exps." in n]
            groups += [QuantGroup(f"layer {i} {what}", part, i)
                       for what, part in (("attention", rest), ("experts", experts)) if part]
        else:
            groups += [QuantGroup(name, [name], i) for name in names]
    groups += [QuantGroup(name, [name], n_layer) for name in head]
    return groups


_ORDER = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_gate.", "ffn_up.", "ffn_down.",
          "ffn_gate_exps.", "ffn_up_exps.", "ffn_down_exps.")


def _tensor_order(name: str) -> tuple[int, str]:
    for k, part in enumerate(_ORDER):
        if part in name:
            return k, name
    return len(_ORDER), name
