"""Layer lists as users write them (`--layers 0-5,9`): the one parser every command uses."""

from __future__ import annotations

from qpsa.errors import QpsaError


def parse_layers(spec: str | None, n_layer: int) -> list[int]:
    """ "0-5,9" -> [0, 1, 2, 3, 4, 5, 9], in the order written; None -> every layer.

    QpsaError naming the problem for an empty item, something not a number or a range, a range
    that runs backwards, a layer out of 0..n_layer−1, or a layer given twice."""
    if spec is None:
        return list(range(n_layer))
    layers: list[int] = []
    parts = [p.strip() for p in spec.split(",")]
    if not spec.strip() or any(not p for p in parts):
        raise QpsaError(f"--layers {spec!r}: empty item (write e.g. 0-5,9)")
    for part in parts:
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise QpsaError(f"--layers {spec!r}: {part!r} is not a layer number or a range like 0-5") from None
        if b < a:
            raise QpsaError(f"--layers {spec!r}: range {part!r} runs backwards (an empty range)")
        for i in range(a, b + 1):
            if not 0 <= i < n_layer:
                raise QpsaError(f"--layers {spec!r}: layer {i} is out of range; the model has {n_layer} layers "
                                f"(0..{n_layer - 1})")
            if i in layers:
                raise QpsaError(f"--layers {spec!r}: layer {i} is given twice")
            layers.append(i)
    return layers
