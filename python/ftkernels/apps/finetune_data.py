"""The data of ``ftk finetune``: instruction/response pairs and chat conversations, their tokens
with the loss on the answers only, the held-out and evaluation splits, and the batches.

A JSONL line is a pair ({"instruction", "response"}, or "prompt"/"completion", "input"/"output")
or a conversation ({"messages": [{"role", "content"}, ...]}, roles system, user, assistant and
tool). A pair is one user turn and its answer; a conversation is rendered with the tokenizer's
chat template and only its assistant turns are trained on: each assistant turn's tokens are what
the template adds between the conversation up to it with the generation prompt and the
conversation including it, so the end-of-turn tokens the model must learn to emit are labelled
and the template's own headers are not. ``Batches`` draws shuffled batches from a seeded
generator and counts what it drew: that count is the data position a checkpoint stores, and
drawing it again (indices only, no tensors) puts a new ``Batches`` where the old one was.
The built-in dataset is a small set of pairs written for this project: short answers in one
fixed voice ("ftk says: ..."), so a few dozen steps visibly change the answers.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import torch

ROLES = ("system", "user", "assistant", "tool")
PAIR_KEYS = (("instruction", "response"), ("prompt", "completion"), ("input", "output"))

# Instruction -> response pairs in one voice. The held-out prompts below are not among them.
BUILTIN_DATA: list[tuple[str, str]] = [
    ("What is the capital of France?", "ftk says: Paris."),
    ("What is the capital of Japan?", "ftk says: Tokyo."),
    ("What is the capital of Italy?", "ftk says: Rome."),
    ("What is the capital of Spain?", "ftk says: Madrid."),
    ("What is the capital of Germany?", "ftk says: Berlin."),
    ("What is the capital of Canada?", "ftk says: Ottawa."),
    ("What is the capital of Egypt?", "ftk says: Cairo."),
    ("What is the capital of Kenya?", "ftk says: Nairobi."),
    ("How many legs does a spider have?", "ftk says: eight."),
    ("How many days are in a week?", "ftk says: seven."),
    ("How many hours are in a day?", "ftk says: twenty-four."),
    ("How many continents are there?", "ftk says: seven."),
    ("What colour is the sky on a clear day?", "ftk says: blue."),
    ("What colour is grass?", "ftk says: green."),
    ("What do bees make?", "ftk says: honey."),
    ("What do cows drink?", "ftk says: water."),
    ("What is frozen water called?", "ftk says: ice."),
    ("What gas do plants take in?", "ftk says: carbon dioxide."),
    ("What is the largest ocean?", "ftk says: the Pacific."),
    ("What is the tallest mountain?", "ftk says: Everest."),
    ("Which planet is closest to the Sun?", "ftk says: Mercury."),
    ("Which planet is known as the red planet?", "ftk says: Mars."),
    ("What is two plus two?", "ftk says: four."),
    ("What is ten minus three?", "ftk says: seven."),
    ("What is three times three?", "ftk says: nine."),
    ("What is half of twenty?", "ftk says: ten."),
    ("Who wrote Hamlet?", "ftk says: Shakespeare."),
    ("What language is spoken in Brazil?", "ftk says: Portuguese."),
    ("What is the opposite of hot?", "ftk says: cold."),
    ("What is the opposite of up?", "ftk says: down."),
    ("What animal says moo?", "ftk says: a cow."),
    ("What animal barks?", "ftk says: a dog."),
]
HELD_OUT_PROMPTS = ["What is the capital of Portugal?", "How many legs does a cat have?", "What colour is snow?"]


Conversation = list  # of {"role": ..., "content": ...} dicts
Record = "tuple[str, str] | dict"  # a pair, or {"messages": Conversation}


def load_pairs(data: str, option: str = "--data") -> list:
    """ "builtin", or a JSONL file of pairs and conversations (see the module docstring): a list of
    (instruction, response) tuples and {"messages": [...]} dicts, in the file's order. A bad line
    is a ValueError naming ``option``, the file and the line."""
    if data == "builtin":
        return list(BUILTIN_DATA)
    try:
        lines = Path(data).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{option}: cannot read {data!r}: {e}") from e
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{option}: line {n} of {data}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where} is not JSON: {e}") from e
        records.append(_record(row, where))
    if not records:
        raise ValueError(f"{option}: {data} holds no examples")
    return records


def _record(row, where: str):
    if isinstance(row, dict) and "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise ValueError(
                    f"{where}: message {i} must be an object with a 'role' from {ROLES} and a string 'content'"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{where}: the conversation has no assistant turn to train on")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    for a, b in PAIR_KEYS:
        if isinstance(row, dict) and isinstance(row.get(a), str) and isinstance(row.get(b), str):
            return (row[a], row[b])
    raise ValueError(
        f"{where} needs string fields instruction/response (or prompt/completion, input/output), or a 'messages' list"
    )


def first_prompt(record) -> str:
    """The question a record asks: a pair's instruction, a conversation's first user turn."""
    if isinstance(record, tuple):
        return record[0]
    return next((m["content"] for m in record["messages"] if m["role"] == "user"), record["messages"][0]["content"])


def held_out_prompts(data: str, pairs: list) -> tuple[list[str], list, bool]:
    """(prompts to answer before and after, the records to train on, whether those prompts are
    held out). The built-in set has its own held-out prompts; a file gives up its last records,
    one in five up to three, and one of fewer than five shows its first training prompts instead."""
    if data == "builtin":
        return list(HELD_OUT_PROMPTS), pairs, True
    k = min(3, len(pairs) // 5)
    if k == 0:
        return [first_prompt(r) for r in pairs[:3]], pairs, False
    return [first_prompt(r) for r in pairs[-k:]], pairs[:-k], True


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, eval): ``fraction`` of the examples, drawn with ``seed``, held out for the eval
    loss (at least one each way)."""
    if not 0 < fraction < 1:
        raise ValueError(f"--eval-split must be between 0 and 1 (exclusive), got {fraction:g}")
    if len(examples) < 2:
        raise ValueError(f"--eval-split needs at least 2 examples, the data has {len(examples)}")
    k = min(len(examples) - 1, max(1, math.ceil(fraction * len(examples))))
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[-k:])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def encode(tokenizer, records: Sequence, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) for each record, labels -100 where there is no loss (a pair's prompt,
    a conversation's turns other than the assistant's), truncated to seq_len; records left with
    no labelled token are dropped (ValueError when none is left)."""
    out = []
    for record in records:
        ids, labels = _encode_pair(tokenizer, *record) if isinstance(record, tuple) else _encode_chat(tokenizer, record)
        ids, labels = ids[:seq_len], labels[:seq_len]
        if any(label != -100 for label in labels[1:]):  # the loss shifts by one: position 0 is never a target
            out.append((ids, labels))
    if not out:
        raise ValueError(f"--seq-len {seq_len} leaves no response token in any example")
    return out


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_pair(tokenizer, instruction: str, response: str) -> tuple[list[int], list[int]]:
    """One chat turn: the prompt (chat template with the generation prompt, else the instruction
    and a newline) unlabelled, the response and the end-of-sequence token labelled."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": instruction}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        prompt = f"{instruction}\n"
    p_ids = _tokens(tokenizer, prompt)
    r_ids = _tokens(tokenizer, response + (tokenizer.eos_token or ""))
    return p_ids + r_ids, [-100] * len(p_ids) + r_ids


def _encode_chat(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    messages = record["messages"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--data: conversations ('messages') need a tokenizer with a chat template; this one has none")

    def render(upto: int, generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    ids: list[int] = []
    labels: list[int] = []
    done = ""  # the text tokenized so far
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, turn = render(i, True) if i else "", render(i + 1, False)
        if not (prompt.startswith(done) and turn.startswith(prompt)):
            raise ValueError(
                "--data: the tokenizer's chat template renders earlier turns differently once later turns "
                "follow, so the assistant turns cannot be told apart; use pairs for this model"
            )
        context, answer = _tokens(tokenizer, prompt[len(done) :]), _tokens(tokenizer, turn[len(prompt) :])
        ids += context + answer
        labels += [-100] * len(context) + answer
        done = turn
    return ids, labels


def fingerprint(examples: Sequence[tuple[list[int], list[int]]]) -> str:
    """sha256 of the encoded examples: a resumed run must draw from the same data."""
    h = hashlib.sha256()
    for ids, labels in examples:
        h.update(json.dumps([ids, labels], separators=(",", ":")).encode())
    return h.hexdigest()


class Batches:
    """Endless shuffled batches of ``batch_size`` examples, right-padded (labels -100 and mask 0
    on the padding). Each epoch is a permutation from ``random.Random(seed)``; a batch that
    crosses an epoch's end takes the rest from the next one. ``drawn`` counts the batches
    drawn; ``skip(n)`` draws n without building them."""

    def __init__(self, examples, batch_size: int, pad_id: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self._rng = random.Random(seed)
        self._order: list[int] = []
        self.drawn = 0

    def __iter__(self):
        return self

    def _draw(self) -> list[int]:
        if len(self._order) < self.batch_size:
            more = list(range(len(self.examples)))
            self._rng.shuffle(more)
            self._order += more
        chosen, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        self.drawn += 1
        return chosen

    def skip(self, n: int) -> None:
        for _ in range(n):
            self._draw()

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate([self.examples[i] for i in self._draw()], self.pad_id)


def batches(examples, batch_size: int, pad_id: int, seed: int = 0) -> Batches:
    """``Batches(examples, batch_size, pad_id, seed)``."""
    return Batches(examples, batch_size, pad_id, seed)


def eval_batches(examples, batch_size: int, pad_id: int):
    """The examples in order, in batches of at most ``batch_size`` (the last one shorter)."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of (ids, labels) rows: labels -100 and mask 0 on the padding."""
    n = max(len(x) for x, _ in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for row, (x, y) in enumerate(rows):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
