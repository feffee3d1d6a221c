"""Greedy generation for prompts, and two models' answers set side by side.

Prompt format: where the file's chat template (`tokenizer.chat_template`) is recognizably ChatML
(it contains "<|im_start|>") or Gemma's (it contains "<start_of_turn>"), the prompt is wrapped in
that format from fixed strings, one user turn and the start of the answer, without a system turn:

    ChatML:  <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n
    Gemma:   <bos><start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n

The template itself (Jinja, untrusted input) is never rendered. Control tokens are placed by id,
and the text between them is tokenized as plain text; BOS comes first where the vocabulary adds it.
Anything else, or `raw=True`, continues the prompt as plain text.

Generation is greedy (argmax, ties to the lowest id), up to `max_new` tokens, stopping after EOS,
EOT or the format's end-of-turn token (which is kept as the last token). Each step re-runs the
whole sequence through the layers and applies the output head to the last position only; at
these lengths no KV cache is needed.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qpsa.errors import QpsaError
from qpsa.model.tokenizer import Tokenizer
from qpsa.model.transformer import Transformer
from qpsa.progress import Advance, no_progress

# compare's default: short tasks whose answers show a damaged model
TASK_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "What is 12 times 7?",
    "Name three colors of the rainbow.",
    "Explain in one sentence what a prime number is.",
)

# noise's default: one-fact questions, whose answers a typo can flip
QUESTION_PROMPTS = (
    "What is the capital of France?",
    "Who wrote Romeo and Juliet?",
    "How many legs does a spider have?",
    "What is the largest planet in the solar system?",
    "What language is spoken in Brazil?",
    "At what temperature does water boil at sea level?",
)

# format -> (start-of-turn token, end-of-turn token)
FORMATS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
}


def read_prompts(path) -> list[str]:
    """One prompt per non-blank line of a UTF-8 file (surrounding whitespace dropped)."""
    from qpsa.fsutil import read_bytes

    path = Path(path)
    data = read_bytes(path, "prompts file")
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise QpsaError(f"{path}: not valid UTF-8 (byte {e.start}: {e.reason})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise QpsaError(f"{path}: no prompts: the file is empty or has only blank lines (one prompt per line)")
    return prompts


def chat_format(metadata: dict, tokenizer: Tokenizer) -> str:
    """"chatml", "gemma" or "raw": the format the file's chat template is recognizably in, where the
    vocabulary has its control tokens."""
    template = metadata.get("tokenizer.chat_template")
    if not isinstance(template, str):
        return "raw"
    for name, (start, end) in FORMATS.items():
        if start in template and all(tokenizer.backend.token_to_id(t) is not None for t in (start, end)):
            return name
    return "raw"


def prompt_ids(tokenizer: Tokenizer, fmt: str, prompt: str) -> list[int]:
    """Token ids of `prompt` in format `fmt` (see the module docstring)."""
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    if fmt == "raw":
        return bos + tokenizer.encode(prompt)
    start, end = (tokenizer.backend.token_to_id(t) for t in FORMATS[fmt])
    answer = "assistant" if fmt == "chatml" else "model"
    return (bos + [start] + tokenizer.encode(f"user\n{prompt}") + [end] + tokenizer.encode("\n")
            + [start] + tokenizer.encode(f"{answer}\n"))


def stop_ids(metadata: dict, tokenizer: Tokenizer, fmt: str) -> set[int]:
    stops = {tokenizer.eos_id, metadata.get("tokenizer.ggml.eot_token_id")}
    if fmt != "raw":
        stops.add(tokenizer.backend.token_to_id(FORMATS[fmt][1]))
    return {int(s) for s in stops if isinstance(s, int)}


def greedy(
    model: Transformer, prompts: Sequence[Sequence[int]], max_new: int, stops: Set[int] = frozenset(),
    advance: Advance = no_progress,
) -> tuple[torch.Tensor, list[list[int]]]:
    """(logits (B, V) at the last position of each prompt, the greedily chosen new tokens of each).

    A sequence ends after `max_new` tokens, after a token in `stops` (kept as its last token; with
    no stops EOS is a token like any other), or when it fills the model's context. The unfinished
    sequences run as one batch, padded on the right: attention is causal, so a position never sees
    the padding after it; one prompt alone gives the same numbers. No cache: each step re-runs
    the whole batch, cheap for short prompts. `advance` is called per step."""
    seqs = [list(ids) for ids in prompts]
    new: list[list[int]] = [[] for _ in seqs]
    limit = model.config.context_length or max(len(x) for x in seqs) + max_new
    running = list(range(len(seqs)))
    first = None
    with torch.inference_mode():
        for step in range(max_new):
            running = [i for i in running if len(seqs[i]) < limit or first is None]
            if not running:
                break
            lengths = torch.tensor([len(seqs[i]) for i in running])  # (B,)
            B, T = len(running), int(lengths.max())
            tokens = torch.zeros(B, T, dtype=torch.long)  # (B, T), right-padded with token 0
            for row, i in enumerate(running):
                tokens[row, : len(seqs[i])] = torch.tensor(seqs[i])
            h = model.run_layers(model.embed(tokens), range(model.config.n_layer), torch.arange(T))  # (B, T, C)
            logits = model.logits(h[torch.arange(B), lengths - 1][:, None])[:, 0]  # (B, V)
            if first is None:
                first = logits.clone()
            still = []
            for i, t in zip(running, logits.argmax(-1).tolist()):
                if len(seqs[i]) >= limit:
                    continue  # a prompt that fills the context: its first logits only
                new[i].append(t)
                if t not in stops:
                    seqs[i].append(t)
                    still.append(i)
            running = still
            advance(f"greedy step {step + 1}/{max_new}, {B} prompts")
    return first, new


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first generated token where a and b differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class SideBySide:
    prompt: str
    n_prompt_tokens: int
    base_tokens: list[int]
    other_tokens: list[int]
    base_text: str
    other_text: str
    diverges_at: int | None  # first differing generated token, None when both are the same
    common_text: str  # the text of the tokens before it (both models)
    base_piece: str | None  # the token each model produced there ("" where one had stopped)
    other_piece: str | None
    first_step_kld: float  # KL(base ‖ other) of the first step's next-token distributions, nats

    def to_dict(self) -> dict:
        return asdict(self)


def side_by_side(base: Transformer, other: Transformer, tokenizer: Tokenizer, metadata: dict,
                 prompts: list[str], max_new: int, raw: bool = False, advance: Advance = no_progress) -> tuple[str, list[SideBySide]]:
    """(format used, one SideBySide per prompt); `advance()` is called after each prompt."""
    fmt = "raw" if raw else chat_format(metadata, tokenizer)
    stops = stop_ids(metadata, tokenizer, fmt)
    rows = []
    for prompt in prompts:
        ids = prompt_ids(tokenizer, fmt, prompt)
        la, (a,) = greedy(base, [ids], max_new, stops)
        lb, (b,) = greedy(other, [ids], max_new, stops)
        kld = 0.0
        if la is not None and lb is not None:
            la, lb = la[0], lb[0]
            lp, lq = torch.log_softmax(la.double(), -1), torch.log_softmax(lb.double(), -1)
            kld = float((lp.exp() * (lp - lq)).sum())
        d = first_divergence(a, b)
        pieces = [None if d is None else tokenizer.decode(t[d : d + 1]) for t in (a, b)]  # "" where one stopped
        common = tokenizer.decode(a[: len(a) if d is None else d])
        rows.append(SideBySide(prompt, len(ids), a, b, tokenizer.decode(a), tokenizer.decode(b), d, common,
                               *pieces, kld))
        advance()
    return fmt, rows
