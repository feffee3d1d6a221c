"""Weights on demand (model/weights.py) and the memory plan (model/budget.py): the same numbers as
the whole float model, edits that stay, and runs that cannot fit refused in one line."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from qpsa.errors import QpsaError
from qpsa.gguf.read import open_gguf
from qpsa.model.budget import plan_memory
from qpsa.model.load import load_model
from qpsa.model.weights import WeightStore
from tests.helpers.tiny import write_tiny_gguf, write_wide_gguf


@pytest.fixture(scope="module")
def q8_model(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("w") / "tiny-q8.gguf", "qwen2", n_layer=3, qtype=Q.Q8_0)


@pytest.fixture(scope="module")
def k_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("wk") / "wide.gguf"
    write_wide_gguf(path)
    from qpsa.gguf.write import write_gguf
    from qpsa.quant.requantize import choose_types, write_requantized  # noqa: F401

    src = open_gguf(path)
    out = path.with_name("wide-q4k.gguf")
    from qpsa.gguf.quants import quantize

    def tensors():
        for name, t in src.tensors.items():
            if len(t.shape) == 2:
                yield name, Q.Q4_K, t.shape, quantize(t.dequantize(), Q.Q4_K)
            else:
                yield name, t.qtype, t.shape, t.raw
    write_gguf(src, src.metadata, src.layout.value_types, tensors(), out)
    return out


def _tight(path) -> int:
    """A --max-memory that holds the on-demand minimum and half a layer more, not the whole model."""
    store = WeightStore.from_gguf(open_gguf(path), budget=0.0)
    loaded = load_model(str(path), tokenizer=False)
    plan = plan_memory(loaded.config, store, torch.device("cpu"), max_memory=2**40, ctx=24, batch=2)
    return plan.minimum + store.layer_bytes() // 2


def _tokens(n=24, vocab=200, batch=2):
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("which", ["q8_model", "k_model"])
def test_on_demand_equals_resident_exactly(which, request):
    path = request.getfixturevalue(which)
    resident = load_model(str(path), tokenizer=False)
    assert resident.memory.resident and resident.model.weights.resident
    lazy = load_model(str(path), tokenizer=False, max_memory=_tight(path), ctx=24, batch=2)
    assert not lazy.memory.resident
    tokens = _tokens(vocab=resident.config.vocab_size)
    with torch.inference_mode():
        a, b = resident.model(tokens), lazy.model(tokens)
    assert torch.equal(a, b)
    store = lazy.model.weights
    assert store.dequantized >= resident.config.n_layer  # layers were built on demand
    assert not store._pinned  # the forward pins nothing
    for name in resident.model.weights:  # the mapping hands out the same values (and pins them)
        assert torch.equal(resident.model.weights[name], store[name]), name


def test_budget_keeps_the_first_layers_and_rebuilds_the_rest(q8_model):
    gguf_file = open_gguf(q8_model)
    store = WeightStore.from_gguf(gguf_file, budget=0.0)
    one = store.layer_bytes()
    store.budget = one * 1.5  # room for one layer
    for _ in range(2):
        for i in range(3):
            store.layer(i)
    assert list(k for k in store._cache if isinstance(k, int)) == [0]
    assert store.dequantized == 1 + 2 * 2  # layer 0 once, layers 1 and 2 on each pass
    store.layer(2)
    store.layer(2)  # the last transient layer is remembered: no rebuild for a second lookup
    assert store.dequantized == 5


def test_edits_through_the_mapping_stay_and_change_the_forward(q8_model):
    resident = load_model(str(q8_model), tokenizer=False)
    lazy = load_model(str(q8_model), tokenizer=False, max_memory=_tight(q8_model), ctx=24, batch=2)
    tokens = _tokens(vocab=resident.config.vocab_size)
    before = lazy.model.weights.fingerprint()
    for loaded in (resident, lazy):
        loaded.model.weights["blk.1.attn_k.weight"].add_(0.01)  # a view into the fused q|k|v
        loaded.model.weights["blk.2.ffn_down.weight"].mul_(1.5)
    assert lazy.model.weights.fingerprint() != before
    for i in range(3):  # cycle other layers through, which would evict an unpinned layer
        lazy.model.weights.layer(i)
    with torch.inference_mode():
        assert torch.equal(resident.model(tokens), lazy.model(tokens))
    assert {1, 2} <= lazy.model.weights._pinned


def test_assignment_replaces_a_tensor(q8_model):
    loaded = load_model(str(q8_model), tokenizer=False, max_memory=2**30)
    w = loaded.model.weights
    new = torch.zeros(w.shape("blk.0.attn_output.weight"))
    w["blk.0.attn_output.weight"] = new
    assert w["blk.0.attn_output.weight"] is new and w.layer(0)["blk.0.attn_output.weight"] is new


def test_embedding_rows_equal_the_full_table(q8_model):
    gguf_file = open_gguf(q8_model)
    lazy = WeightStore.from_gguf(gguf_file, budget=0.0)
    full = WeightStore.from_gguf(gguf_file)
    tokens = _tokens(vocab=gguf_file.tensors["token_embd.weight"].shape[0])
    assert torch.equal(lazy.embedding(tokens), torch.nn.functional.embedding(tokens, full["token_embd.weight"]))
    assert "token_embd.weight" not in lazy._cache  # only rows were dequantized


def test_float_dict_becomes_a_resident_store(q8_model):
    from qpsa.model.transformer import Transformer

    loaded = load_model(str(q8_model), tokenizer=False)
    w = loaded.model.weights
    floats = {k: v.clone() for k, v in w.items() if "_qkv." not in k and "_gate_up." not in k and k != "output.weight"}
    other = Transformer(loaded.config, floats, dtype=torch.float64)
    assert other.weights.resident and other.dtype == torch.float64
    assert other.weights["blk.0.attn_qkv.weight"].dtype == torch.float64
    assert "output.weight" in other.weights  # tied: the head is the embedding
    assert other.weights["output.weight"] is other.weights["token_embd.weight"]


def test_plan_resident_on_demand_or_refused(q8_model):
    gguf_file = open_gguf(q8_model)
    loaded = load_model(str(q8_model), tokenizer=False)
    cfg, device = loaded.config, torch.device("cpu")
    store = WeightStore.from_gguf(gguf_file, budget=0.0)
    assert plan_memory(cfg, store, device, max_memory=2**34).resident
    roomy = plan_memory(cfg, store, device, max_memory=_tight(q8_model), ctx=24, batch=2)
    assert not roomy.resident and roomy.cache_budget >= 0
    with pytest.raises(QpsaError, match="below one layer"):
        plan_memory(cfg, store, device, max_memory=store.layer_bytes() // 2)
    with pytest.raises(QpsaError, match=r"needs .* available .*--max-memory.*--dtype bfloat16"):
        plan_memory(cfg, store, device, max_memory=store.layer_bytes() + 1)


def test_a_model_larger_than_memory_is_one_line(q8_model, monkeypatch):
    """What an 8B model on a small machine meets: the machine's available memory, not --max-memory."""
    import qpsa.model.budget as budget

    monkeypatch.setattr(budget, "available_memory", lambda device: (1000, "MemAvailable in /proc/meminfo"))
    with pytest.raises(QpsaError, match=r"not enough memory on cpu: this run needs .* but 1000 B is available "
                                        r"\(MemAvailable in /proc/meminfo\)"):
        load_model(str(q8_model), tokenizer=False)


def test_sizes_and_devices_are_checked():
    from qpsa.model.device import available_memory, parse_size, resolve_device, resolve_dtype

    assert parse_size("12G") == 12 * 2**30 and parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("800m") == 800 * 2**20
    assert parse_size("4096") == 4096
    for bad in ("", "abc", "-1G", "0", "12X"):
        with pytest.raises(QpsaError):
            parse_size(bad)
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "gpu0"):
        with pytest.raises(QpsaError, match="not a device"):
            resolve_device(bad)
    with pytest.raises(QpsaError, match="no such GPU" if torch.cuda.is_available() else "without CUDA|no CUDA GPU"):
        resolve_device("cuda:99")
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(QpsaError, match="not supported"):
        resolve_dtype("float8", torch.device("cpu"))
    free, where = available_memory(torch.device("cpu"))
    assert free > 0 and where


def test_bfloat16_on_the_cpu_is_close_to_float32(q8_model):
    a = load_model(str(q8_model), tokenizer=False)
    b = load_model(str(q8_model), tokenizer=False, dtype=torch.bfloat16)
    tokens = _tokens(vocab=a.config.vocab_size)
    with torch.inference_mode():
        la, lb = a.model(tokens), b.model(tokens).float()
    assert lb.dtype == torch.float32 and b.compute()["dtype"] == "bfloat16"
    assert (la.softmax(-1) - lb.softmax(-1)).abs().max() < 0.05


def test_torch_dequantizers_create_nothing_on_another_device():
    """Every torch dequantizer keeps to its input's device (on 'meta', a stray CPU tensor would raise)."""
    from qpsa.gguf.quants import GRIDS
    from qpsa.gguf.quants.common import QuantGrid

    for qtype, grid in GRIDS.items():
        if type(grid).dequantize_torch is QuantGrid.dequantize_with_gguf:
            continue  # a type without a torch dequantizer (none today): gguf's numpy one, a CPU round trip
        blocks = torch.zeros(4, grid.type_size, dtype=torch.uint8, device="meta")
        out = grid.dequantize_torch(blocks)
        assert out.device.type == "meta" and out.shape == (4, grid.block_size), qtype.name


def test_fisher_needs_the_whole_model(q8_model):
    loaded = load_model(str(q8_model), tokenizer=False)
    store = WeightStore.from_gguf(open_gguf(q8_model), budget=0.0)
    with pytest.raises(QpsaError, match="for fisher, which needs the whole model in float at once"):
        plan_memory(loaded.config, store, torch.device("cpu"), max_memory=_tight(q8_model), ctx=24, batch=2,
                    grad=True, whole="fisher")


def test_released_layers_are_rebuilt_from_the_file(q8_model):
    store = WeightStore.from_gguf(open_gguf(q8_model), budget=0.0)
    w = store["blk.1.attn_k.weight"]
    saved = w.clone()
    w.add_(1.0)
    assert 1 in store._pinned
    w.copy_(saved)
    store.release(["blk.1.attn_k.weight"])
    assert 1 not in store._pinned and 1 not in store._cache
    assert torch.equal(store.layer(1)["blk.1.attn_k.weight"], saved)


def test_weight_norm_and_noise_floor_copy_do_not_pin(q8_model):
    from qpsa.scores.qpsa.evaluate import other_precision

    loaded = load_model(str(q8_model), tokenizer=False, max_memory=_tight(q8_model), ctx=24, batch=2)
    other = other_precision(loaded.model)
    assert other.dtype == torch.float64 and not other.weights.resident
    assert torch.equal(other.weights.layer(0)["blk.0.attn_qkv.weight"], loaded.model.weights.layer(0)["blk.0.attn_qkv.weight"].double())
    assert not loaded.model.weights._pinned


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("wm") / "moe.gguf", "qwen3moe", n_layer=3, qtype=Q.Q8_0,
                           expert_qtype=Q.Q4_K, n_embd=256, n_ff_exp=256, n_expert=4)


def test_moe_on_demand_equals_resident_and_experts_are_views(moe_model):
    """The experts' gate | up are one (E, 2F, C) tensor on demand too, filled expert by expert from the
    file; the forward is bit for bit the resident one, and a write into one expert changes the fused tensor."""
    resident = load_model(str(moe_model), tokenizer=False)
    lazy = load_model(str(moe_model), tokenizer=False, max_memory=_tight(moe_model), ctx=24, batch=2)
    assert not lazy.memory.resident
    tokens = _tokens(vocab=resident.config.vocab_size)
    with torch.inference_mode():
        assert torch.equal(resident.model(tokens), lazy.model(tokens))
    assert not lazy.model.weights._pinned
    store = lazy.model.weights
    fused = store["blk.1.ffn_gate_up_exps.weight"]
    gate, up = store["blk.1.ffn_gate_exps.weight"], store["blk.1.ffn_up_exps.weight"]
    assert fused.shape == (4, 2 * gate.shape[1], 256) and torch.equal(fused, torch.cat([gate, up], dim=1))
    assert torch.equal(fused, resident.model.weights["blk.1.ffn_gate_up_exps.weight"])
    up[2].add_(1.0)
    assert torch.equal(fused[2, gate.shape[1]:], up[2])


def test_a_layer_built_in_inference_mode_can_be_edited_later(q8_model):
    """The forward builds (and caches) layers inside inference mode; handing one out later for an edit works."""
    store = WeightStore.from_gguf(open_gguf(q8_model), budget=float(2**40) - 1)
    with torch.inference_mode():
        store.layer(0)
    w = store["blk.0.attn_v.weight"]
    w.add_(1.0)
    assert torch.equal(store.layer(0)["blk.0.attn_v.weight"], w)


def test_gradient_predictors_need_the_whole_model(q8_model, tmp_path, capsys):
    from tests.helpers.cli_run import assert_user_error, run

    code, _, err = run(capsys, "predictors", q8_model, "--chunks", 1, "--ctx", 24, "--predictors", "fisher_kl",
                       "--max-memory", _tight(q8_model), "--out", tmp_path / "p")
    assert_user_error(code, err, "for the gradient predictors (fisher_kl), which needs the whole model in float at once")


@pytest.mark.parametrize("which", ["q8_model", "k_model"])
def test_head_streamed_from_the_file_gives_the_resident_nlls(which, request, monkeypatch):
    """On demand, the output head's NLLs come from its rows dequantized block by block (never the
    whole float head): the same numbers as the resident head, blocks and chunks of odd sizes."""
    from qpsa.model import transformer, weights

    path = request.getfixturevalue(which)
    resident = load_model(str(path), tokenizer=False)
    lazy = load_model(str(path), tokenizer=False, max_memory=_tight(path), ctx=24, batch=2)
    width = resident.config.n_embd
    monkeypatch.setattr(weights, "CHUNK_WEIGHTS", 7 * width)  # blocks of 7 rows
    monkeypatch.setattr(transformer, "HEAD_CHUNK", 5)  # matmuls of 5 rows, across the blocks' edges
    store = lazy.model.weights
    store.release(list(store._cache))
    store.budget = 0.0  # nothing cached: the head as an 8B model's is under --max-memory 3G
    assert not isinstance(store.head_rows("output.weight"), torch.Tensor)  # the streamed path is taken
    targets = _tokens(vocab=resident.config.vocab_size)
    h = torch.randn(2, 24, width, generator=torch.Generator().manual_seed(1))  # states before the final norm
    with torch.inference_mode():
        a, b = resident.model.head_nll(h, targets), lazy.model.head_nll(h, targets)
    assert torch.allclose(a, b, rtol=0, atol=1e-5) and torch.isfinite(b).all()
