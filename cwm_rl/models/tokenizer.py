"""The byte-level BPE tokenizers of cwm-rl's locally made models, trained on env task text.

`train_tokenizer(vocab_size, seed)` returns a transformers `PreTrainedTokenizerFast` with:
- byte-level BPE (any text round-trips) whose digits are always single tokens, so a tiny
  model sees `123` as `1 2 3` and can learn column arithmetic quickly, and whose newlines are
  always single tokens, so text after the template's `\n` tokenises the same on its own;
- special tokens `<|begin_of_text|>` (bos), `<|end_of_text|>` (pad), `<|im_start|>` and
  `<|im_end|>` (eos: a chat turn ends with it, and generation stops on it);
- `<think>` and `</think>` as single ordinary tokens (CWM's reasoning format; decoding with
  `skip_special_tokens=True` keeps them);
- the ChatML-like chat template of `cwm_rl.models.chat_template`.

The tokenizer adds no special tokens by itself (`encode(text)` never prepends BOS): the chat
template writes BOS once at the start of a conversation, and token-in/token-out workers
append the tokens of each new piece of rendered text as they are.

The training text is made here, deterministically: arithmetic tasks of every difficulty level
with answers in CWM's format (`<think> ... </think>`, `\\boxed{}`), the Math and Echo envs'
prompts, and a few KB of generic English and code so that other text tokenises sensibly.

`train_tokenizer(..., kind="cwm")` speaks CWM's formats instead, so that a config moves from a tiny
model to a CWM checkpoint by its model path alone (`tokenizer_format("cwm")`): special tokens
`<|begin_of_text|>` (bos), `<|end_of_text|>` (ends a document, a trace say), `<|pad|>` (pad, CWM's
name), `<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>` (eos: ends a chat turn) and CWM's eight
trace tokens (`envs.trace.cwm_format.TRACE_TOKENS`), ids 0-13 in CWM's order; CWM's chat template;
generation stops on `<|eot_id|>` and `<|end_of_text|>`. Its training text (`cwm_corpus`) is the one
above with its chat turns in CWM's template, plus python and bash tool turns and generated programs
as trace prompts show them. Digits, newlines, `<think>` and `</think>` are as above.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

BOS, PAD, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, PAD, IM_START, IM_END]  # ids 0-3, in this order
VOCAB_SIZE = 1024  # an upper bound: the corpus runs out of merges at about 1,010 ids
THINK_TOKENS = ["<think>", "</think>"]  # ordinary (non-special) single tokens, the last two ids: decoding keeps them
START_HEADER, END_HEADER, EOT, CWM_PAD = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"
TOKENIZERS: tuple[str, ...] = ("default", "cwm")


@dataclass(frozen=True)
class TokenizerFormat:
    """The special tokens of one tokenizer kind (ids 0, 1, ... in this order), what each is for, and its chat template."""

    special_tokens: tuple[str, ...]
    bos: str
    stop: tuple[str, ...]  # generation stops on each; the first ends a chat turn (the tokenizer's eos)
    pad: str
    chat_template: str


def tokenizer_format(kind: str) -> TokenizerFormat:
    """The format of tokenizer `kind`: "default" (ChatML) or "cwm" (CWM's chat and trace tokens)."""
    from cwm_rl.models.chat_template import CHAT_TEMPLATE, CWM_CHAT_TEMPLATE

    if kind == "default":
        return TokenizerFormat(tuple(SPECIAL_TOKENS), bos=BOS, stop=(IM_END,), pad=PAD, chat_template=CHAT_TEMPLATE)
    if kind == "cwm":
        from envs.trace.cwm_format import BEGIN_OF_TEXT, END_OF_TEXT, TRACE_TOKENS  # here: `import envs` registers every env

        return TokenizerFormat((BEGIN_OF_TEXT, END_OF_TEXT, CWM_PAD, START_HEADER, END_HEADER, EOT, *TRACE_TOKENS),
                               bos=BEGIN_OF_TEXT, stop=(EOT, END_OF_TEXT), pad=CWM_PAD, chat_template=CWM_CHAT_TEMPLATE)
    raise ValueError(f"unknown tokenizer {kind!r}; choose one of {', '.join(TOKENIZERS)}")

GENERIC_TEXT = r'''
The quick brown fox jumps over the lazy dog. A language model reads text as a sequence of tokens
and predicts the next one. In reinforcement learning, the model acts in an environment, receives
a reward, and updates its policy so that rewarded actions become more likely. The environment
returns an observation after every step; an episode ends when it is terminated or truncated.
Please answer the question below. Think step by step, check your work, and then give the final
answer. If the tests fail, read the error message, fix the bug, and run the tests again.
You are a helpful assistant. The user asks a question and the assistant answers it clearly.
This function returns the sum of a list of numbers. The file was not found. Permission denied.
Traceback (most recent call last): File "main.py", line 3, in <module> ValueError: bad input
AssertionError: expected 4, got 5. All tests passed. 2 failed, 10 passed in 0.31s.
Let me look at the code first. I will open the file, find the function, and change one line.
The answer is correct. The answer is wrong. Try again. Well done! Here is the result:

def add(a: int, b: int) -> int:
    """Return the sum of a and b."""
    return a + b


def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()


import json
import os
from pathlib import Path

for i in range(10):
    if i % 2 == 0:
        print(f"{i} is even")
    else:
        print(f"{i} is odd")

with open("data.json") as f:
    data = json.load(f)
result = {key: value for key, value in data.items() if value is not None}
assert len(result) > 0, "empty result"
print(sorted(result, key=lambda k: (len(k), k)))

def test_add():
    assert add(2, 3) == 5
    assert add(-1, 1) == 0

try:
    x = int(input())
except ValueError as e:
    print("error:", e)

$ python -m pytest tests/ -q
$ git diff --stat && git commit -m "Fix the off-by-one error in the parser"
$ ls -la /tmp && cat README.md | grep -n "install"
{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi!"}
<tool_call>{"name": "run_tests", "arguments": {"path": "tests/test_add.py"}}</tool_call>
int main(void) { int x = 0; for (int i = 0; i < 10; ++i) { x += i; } return x; }
const sum = (xs) => xs.reduce((a, b) => a + b, 0); console.log(sum([1, 2, 3]));
SELECT name, COUNT(*) FROM users WHERE age >= 18 GROUP BY name ORDER BY name;
'''


Chat = Callable[[Sequence[tuple[str, str]]], str]  # (header, content) turns -> one document


def chatml_text(turns: Sequence[tuple[str, str]]) -> str:
    """Turns as the default corpus writes them: `role\\ncontent`, one after another (no special tokens)."""
    return "\n".join(f"{header}\n{content}" for header, content in turns)


def cwm_text(turns: Sequence[tuple[str, str]]) -> str:
    """Turns in CWM's chat template."""
    return "".join(f"{START_HEADER}{header}{END_HEADER}\n\n{content}{EOT}" for header, content in turns)


def corpus(seed: int = 0, num_tasks_per_level: int = 400, chat: Chat = chatml_text) -> Iterator[str]:
    """The tokenizer's training text, one document per item, chat turns written by `chat` (deterministic for a seed)."""
    from envs.echo_env import WORDS
    from envs.math_env import PROMPT_PLAIN, PROMPT_THINK
    from envs.tasks.math_tasks import DIFFICULTY_LEVELS, arithmetic_task

    rng = np.random.default_rng(seed)
    yield chat([("system", PROMPT_PLAIN)])
    yield chat([("system", PROMPT_THINK)])
    for level in sorted(DIFFICULTY_LEVELS):
        for _ in range(num_tasks_per_level):
            task = arithmetic_task(rng, level)
            answer = f"The answer is \\boxed{{{task.answer}}}."
            yield chat([("user", task.prompt), ("assistant", answer)])
            yield chat([("user", task.prompt), ("assistant", f"<think>\nI need to work out: {task.prompt}\n</think>\n{answer}")])
            yield f"<think>\n{task.prompt} The result is {task.answer}.\n</think>\n\\boxed{{{task.answer}}}"
    for _ in range(200):
        word = str(rng.choice(WORDS))
        yield chat([("user", f"Repeat exactly: {word}"), ("assistant", word)])
    for _ in range(20):  # weigh the generic text like a few hundred task documents
        yield from GENERIC_TEXT.strip().split("\n\n")


def cwm_corpus(seed: int = 0, num_per_level: int = 50) -> Iterator[str]:
    """The cwm tokenizer's training text: `corpus(seed)` in CWM's chat template, python tool turns on
    integer arithmetic, and generated programs (a trace prompt's source and lines, a bash tool turn that
    shows them); deterministic for a seed.

    It yields the text between special tokens: BPE training does not split them out of its text by itself,
    and their names must not use up merges."""
    from envs.tasks.math_tasks import arithmetic_task
    from envs.tools import TOOL_PROMPT
    from envs.trace.cwm_format import marked_source
    from envs.trace.programs import LEVELS, generate_program

    rng = np.random.default_rng(seed)

    def documents() -> Iterator[str]:
        yield from corpus(seed, chat=cwm_text)
        for level in (1, 2, 3, 4):  # integers only: python prints the task's answer
            for _ in range(num_per_level):
                task = arithmetic_task(rng, level)
                expression = task.prompt.removeprefix("What is ").removesuffix("?")
                yield cwm_text([("system", TOOL_PROMPT.format(n=2)), ("user", task.prompt),
                                ("assistant", f"<tool: python>\nprint({expression})\n</tool>"),
                                ("tool: python", f"<output>\n{task.answer}\n</output>"),
                                ("assistant", f"The answer is \\boxed{{{task.answer}}}.")])
        for level in LEVELS:
            for _ in range(num_per_level):
                source, function, args = generate_program(rng, level)
                yield marked_source(source, function)
                yield "\n".join(line.strip() for line in source.splitlines())  # a trace frame's SOURCE_LINEs
                yield cwm_text([("user", f"What does {function}({', '.join(map(repr, args))}) return? It is in main.py."),
                                ("assistant", "<tool: bash>\ncat main.py\n</tool>"),
                                ("tool: bash", f"<output>\n{source}\n</output>")])

    special = re.compile("|".join(re.escape(t) for t in tokenizer_format("cwm").special_tokens))
    for document in documents():
        yield from (piece for piece in special.split(document) if piece)


def train_tokenizer(vocab_size: int = VOCAB_SIZE, seed: int = 0, model_max_length: int = 2048,
                    kind: str = "default") -> PreTrainedTokenizerFast:
    """Train the byte-level BPE tokenizer of `kind` (default or cwm) on its corpus; returns it ready to `save_pretrained`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    fmt = tokenizer_format(kind)
    min_vocab = 256 + len(fmt.special_tokens) + len(THINK_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs at least {min_vocab}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # A newline is always its own token: the generation prompt ends with one, and a reply that
        # starts with spaces ("    return x") must tokenise the same generated alone or rendered whole.
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        special_tokens=list(fmt.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed) if kind == "default" else cwm_corpus(seed), trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=fmt.bos,
        eos_token=fmt.stop[0],
        pad_token=fmt.pad,
        chat_template=fmt.chat_template,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
