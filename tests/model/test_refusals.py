"""Nothing ignored: a file with a tensor or a metadata key that q-psa's forward would not use is
refused with one line naming it; a damaged variant that q-psa does implement is computed as
llama.cpp computes it (KLD against llama.cpp on the damaged file, as on the converted one).

The variants are made from llama.cpp's own converted tiny models (tests/helpers/converted.py),
rewritten with one change each: never silently wrong means one of the two, for every case.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from helpers.cli_run import assert_user_error, run
from helpers.converted import converted, kld_top1, llamacpp_logits, qpsa_logits, sample_tokens

from qpsa.errors import QpsaError
from qpsa.gguf.read import open_gguf
from qpsa.gguf.write import write_gguf
from qpsa.model.load import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

F32, STR, U32, BOOL = gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.BOOL


def damaged(family: str, out, set_keys: dict | None = None, drop: tuple = (), add_tensors: dict | None = None):
    """The converted file of `family` with metadata keys set ({key: (value, GGUFValueType)}),
    keys or tensors dropped, and float32 tensors added."""
    src = open_gguf(converted(family))
    metadata = {k: v for k, v in src.metadata.items() if k not in drop}
    types = dict(src.layout.value_types)
    for key, (value, vtype) in (set_keys or {}).items():
        metadata[key] = value
        types[key] = (vtype, None)
    tensors = [(n, t.qtype, t.shape, t.raw) for n, t in src.tensors.items() if n not in drop]
    for name, data in (add_tensors or {}).items():
        tensors.append((name, gguf.GGMLQuantizationType.F32, data.shape, data.astype(np.float32).view(np.uint8)))
    return write_gguf(src, metadata, types, tensors, out)


REFUSED = [
    # a tensor the forward would not use
    ("llama3", dict(add_tensors={"blk.0.attn_output.bias": np.ones(128)}), "blk.0.attn_output.bias"),
    ("qwen3", dict(add_tensors={"blk.1.ffn_up.bias": np.ones(256)}), "blk.1.ffn_up.bias"),
    ("gemma2", dict(add_tensors={"rope_freqs.weight": np.ones(24)}), "rope_freqs.weight"),
    ("phi3", dict(add_tensors={"blk.2.attn_q_norm.weight": np.ones(32)}), "blk.2.attn_q_norm.weight"),
    ("qwen3moe", dict(add_tensors={"blk.0.ffn_gate_inp_shexp.weight": np.ones(96)}), "blk.0.ffn_gate_inp_shexp.weight"),
    # a metadata key q-psa does not know (an attention variant, a soft-cap where the arch has none)
    ("llama3", dict(set_keys={"llama.attention.scale": (0.5, F32)}), "llama.attention.scale"),
    ("llama2", dict(set_keys={"llama.final_logit_softcapping": (30.0, F32)}), "llama.final_logit_softcapping"),
    ("qwen3", dict(set_keys={"qwen3.attention.sliding_window": (16, U32)}), "qwen3.attention.sliding_window"),
    ("phi3", dict(set_keys={"phi3.attn_logit_softcapping": (50.0, F32)}), "phi3.attn_logit_softcapping"),
    ("gemma2", dict(set_keys={"gemma2.attention.clamp_kqv": (8.0, F32)}), "gemma2.attention.clamp_kqv"),
    ("qwen3moe", dict(set_keys={"qwen3moe.attention.sliding_window": (16, U32)}), "qwen3moe.attention.sliding_window"),
    # routing other than qwen3moe's (softmax, top-k, renormalized): sigmoid gating
    ("qwen3moe", dict(set_keys={"qwen3moe.expert_gating_func": (2, U32)}), "qwen3moe.expert_gating_func"),
    # a known key at a value q-psa does not implement
    ("mistral", dict(set_keys={"llama.expert_count": (8, U32)}), "llama.expert_count"),
    ("qwen2", dict(set_keys={"qwen2.attention.causal": (False, BOOL)}), "qwen2.attention.causal"),
    # a rope type changed
    ("llama3", dict(set_keys={"llama.rope.scaling.type": ("yarn", STR)}), "llama.rope.scaling.type"),
    ("qwen3", dict(set_keys={"qwen3.rope.scaling.type": ("longrope", STR)}), "qwen3.rope.scaling.type"),
    ("gemma2", dict(set_keys={"gemma2.rope.scaling.type": ("su", STR)}), "gemma2.rope.scaling.type"),
    # a needed tensor missing
    ("phi3", dict(drop=("blk.0.attn_qkv.weight",)), "blk.0.attn_qkv.weight"),
    ("qwen3moe", dict(drop=("blk.1.ffn_gate_inp.weight",)), "blk.1.ffn_gate_inp.weight"),
]


@pytest.mark.parametrize("family, change, needle", REFUSED, ids=[f"{f}-{n}" for f, _, n in REFUSED])
def test_damaged_file_is_refused_naming_the_cause(tmp_path, capsys, prose, family, change, needle):
    path = damaged(family, tmp_path / "damaged.gguf", **change)
    with pytest.raises(QpsaError, match=needle.replace(".", r"\.")):
        load_model(str(path), tokenizer=False)
    code, _, err = run(capsys, "ppl", path, "--text", prose)  # the CLI: one line, exit 2
    assert_user_error(code, err, needle)


COMPUTED = [
    # forward-changing keys q-psa implements: the damaged file is computed as llama.cpp computes it
    ("gemma2", {"gemma2.attn_logit_softcapping": (5.0, F32)}, True),
    ("gemma2", {"gemma2.final_logit_softcapping": (3.0, F32)}, True),
    ("gemma2", {"gemma2.attention.sliding_window": (5, U32)}, True),
    ("gemma2", {"gemma2.attention.sliding_window_pattern": (3, U32)}, True),
    ("gemma2", {"gemma2.rope.freq_base_swa": (100.0, F32)}, True),
    ("llama2", {"llama.rope.scaling.type": ("linear", STR), "llama.rope.scaling.factor": (4.0, F32)}, True),
    ("qwen2", {"qwen2.rope.scaling.attn_factor": (1.5, F32)}, True),
    ("phi3", {"phi3.rope.scaling.original_context_length": (16, U32)}, True),  # the long factors from 17 tokens on
    ("qwen3", {"qwen3.rope.scaling.type": ("none", STR), "qwen3.rope.scaling.factor": (4.0, F32)}, False),  # "none" never scales
    ("qwen3moe", {"qwen3moe.expert_used_count": (3, U32)}, True),  # three experts per token
    ("qwen3moe", {"qwen3moe.expert_gating_func": (1, U32), "qwen3moe.expert_weights_norm": (True, BOOL)}, False),  # its own
]


@pytest.mark.parametrize("family, keys, changes", COMPUTED, ids=[f"{f}-{'-'.join(k)}" for f, k, _ in COMPUTED])
def test_damaged_file_is_computed_as_llamacpp_computes_it(tmp_path, family, keys, changes, llama_cpp):
    path = damaged(family, tmp_path / "damaged.gguf", set_keys=keys)
    tokens = sample_tokens(family, 48)
    ours, cpp = qpsa_logits(path, tokens), llamacpp_logits(path, tokens)
    kld, top1 = kld_top1(cpp, ours)
    assert kld <= 0.01 and top1 >= 0.95, (kld, top1)
    difference = np.abs(ours - qpsa_logits(converted(family), tokens)).max()
    assert difference > 1e-2 if changes else difference == 0  # the change reached the forward (or rightly not)


def test_phi3_without_rope_factors_loads(tmp_path, llama_cpp):
    """Phi-3 "4k" files carry no rope_factors tensors: plain rope, as llama.cpp computes it."""
    path = damaged("phi3", tmp_path / "short.gguf", drop=("rope_factors_long.weight", "rope_factors_short.weight",
                                                          "phi3.rope.scaling.attn_factor"))
    tokens = sample_tokens("phi3", 48)
    kld, top1 = kld_top1(llamacpp_logits(path, tokens), qpsa_logits(path, tokens))
    assert kld <= 0.01 and top1 >= 0.95, (kld, top1)


def test_harmless_keys_load_and_change_nothing(tmp_path):
    """Keys real files carry that cannot change the forward (or at their no-op value) are accepted."""
    keys = {"llama.tensor_data_layout": ("Meta AI original pth", STR), "llama.expert_count": (0, U32),
            "llama.expert_used_count": (0, U32), "llama.attention.causal": (True, BOOL),
            "llama.rope.scaling.finetuned": (False, BOOL), "llama.rope.scaling.original_context_length": (8192, U32)}
    path = damaged("llama3", tmp_path / "harmless.gguf", set_keys=keys)
    tokens = sample_tokens("llama3", 32)
    assert np.array_equal(qpsa_logits(path, tokens), qpsa_logits(converted("llama3"), tokens))
