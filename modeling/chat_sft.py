"""Chat fine-tuning: ``--task sft`` on conversations (``messages`` data, ``ChatExample``).

A conversation is trained as the model will be called: rendered with the chat template its
package will carry, tokenized as ``chat()`` tokenizes it (runtime/chat.py: the rendered text
WITHOUT the tokenizer's special-token template, since the template writes its own BOS), with
the loss on the assistant turns only.

The template
------------
* A model imported from Hugging Face (or fine-tuned from one) keeps its own: PackageInfo's
  ``chat_template`` and ``chat_tokens``, read from its tokenizer_config.json. Where its turns end
  with a special token its eos ids lack (ChatML's ``<|im_end|>`` in a base model), that token
  joins the eos ids: the model learns to write it, so generation stops there.
* A model trained here gets ``DEFAULT_CHAT_TEMPLATE``, ChatML-like::

      <s><|im_start|>system\\nbe brief<|im_end|>\\n<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\nhello<|im_end|>\\n

  A tokenizer trained for the run gets ``<|im_start|>`` and ``<|im_end|>`` as special tokens
  (ids 5 and 6, after ``<pad> <s> </s> <unk> <mask>``), and ``<|im_end|>`` ends generation
  besides ``</s>``. A tokenizer loaded without them (one of our checkpoints trained on other
  data) writes the turns with its own special tokens instead: ``<s>`` opens a turn, ``</s>``
  closes it (``fallback_chat_template``).
* The template, the variables it reads (``bos_token``, ... as runtime/chat.py passes them) and
  the end-of-turn ids are saved in the checkpoint's package.json (``chat_package``), so export
  writes them into the manifest and both runtimes' ``chat()`` render the same text and ids.

The loss mask
-------------
For each assistant turn ``i`` the template is rendered three times: ``messages[:i]`` with the
generation prompt (the text ``chat()`` would send before that answer), ``messages[:i + 1]``
without it, and the whole conversation. Each must be a prefix of the next (else the template
renders turns differently depending on what follows and no mask can be read off it: an error
naming the turn). The assistant span runs from the end of the first to the end of the turn's
end-of-turn marker (the first stop token's text after the content; without one, the rest of
the turn's text, trailing whitespace excluded). The whole conversation is tokenized once, and
a token is trained on when its character offsets lie inside an assistant span, so the
trained tokens decode to each answer plus its end-of-turn marker. ``prompt_len`` is the token
length of the last answer's prompt as ``chat()`` tokenizes it alone; a conversation whose
tokens differ there (a token merging across the boundary) is counted (``ChatRow.consistent``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch
from tokenizers import Tokenizer

from onnxformer.runtime.chat import render, special_token_variables
from onnxformer.runtime.errors import ConfigError, DataError, InputError
from onnxformer.runtime.generation import GenerationConfig

from .data import ChatExample, Message, TaskData
from .generate import generate
from .hf_import import PackageInfo
from .model import Transformer
from .tokenizer import special_token_ids

logger = logging.getLogger(__name__)

CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"
CHAT_TOKENS = (CHAT_START, CHAT_END)  # special tokens a tokenizer trained for chat data gets

# ChatML with the tokenizer's BOS first. Written on one line: chat.py renders with trim_blocks.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def fallback_chat_template(start: str, end: str) -> str:
    """ChatML's layout with the tokens a loaded tokenizer has: `start` (its BOS text, or "")
    opens each turn, `end` (its EOS text) closes it."""
    for name, token in (("start", start), ("end", end)):
        if "'" in token or "\\" in token or "{" in token:
            raise ConfigError(f"the tokenizer's {name} token {token!r} cannot be written into a chat template")
    return ("{% for message in messages %}"
            f"{{{{ '{start}' + message['role'] + '\\n' + message['content'] + '{end}' + '\\n' }}}}{{% endfor %}}"
            f"{{% if add_generation_prompt %}}{{{{ '{start}assistant\\n' }}}}{{% endif %}}")


def new_tokenizer_special_tokens(data: TaskData) -> tuple[str, ...]:
    """The special tokens beyond the family's that a tokenizer trained on `data` gets."""
    return CHAT_TOKENS if data.kind == "chat" else ()


def tokenizer_texts(data: TaskData):
    """A new tokenizer's corpus for chat data: each turn as the template writes it, without the
    markers (special tokens: never merged with text)."""
    for example in data.train:
        for message in example.messages:
            yield f"{message.role}\n{message.content}"


def chat_package(tokenizer: Tokenizer, package: PackageInfo | None) -> PackageInfo:
    """What a chat run saves as package.json: the model's own template where it has one (an
    import), else the default (its markers as special tokens) or the fallback with the
    tokenizer's BOS and EOS, with the end-of-turn token among the generation's eos ids."""
    package = package or PackageInfo()
    if package.chat_template is not None:
        return _with_turn_end(tokenizer, package)
    ids = dict(package.special_tokens) if package.special_tokens else special_token_ids(tokenizer)
    eos = ids.get("eos", -1)
    if eos < 0:
        raise ConfigError("chat fine-tuning needs an eos token to end each turn with; the tokenizer has none: set "
                          "eos_token in tokenizer_config.json (or eos_token_id in config.json)")
    start_id, end_id = tokenizer.token_to_id(CHAT_START), tokenizer.token_to_id(CHAT_END)
    if start_id is not None and end_id is not None and ids.get("bos", -1) >= 0:
        template, turn_end = DEFAULT_CHAT_TEMPLATE, end_id
    else:
        bos = tokenizer.id_to_token(ids["bos"]) if ids.get("bos", -1) >= 0 else ""
        template, turn_end = fallback_chat_template(bos, tokenizer.id_to_token(eos)), eos
        logger.info("chat template: the tokenizer has no %s/%s tokens; turns are written between %r and %r",
                    CHAT_START, CHAT_END, bos, tokenizer.id_to_token(eos))
    stops = list(dict.fromkeys([turn_end, *package.generation.get("eos_token_ids", []), eos]))
    return dataclasses.replace(package, chat_template=template,
                               generation={**package.generation, "eos_token_ids": stops})


def _with_turn_end(tokenizer: Tokenizer, package: PackageInfo) -> PackageInfo:
    """An import's package, with its template's end-of-turn token (the special token that closes
    an answer, e.g. ChatML's <|im_end|> in a base model whose eos is <|endoftext|>) added to the
    generation's eos ids: training teaches the model to write it, so generation must stop there."""
    probe = ChatExample((Message("user", "hi"), Message("assistant", "hello")))
    try:
        row = ChatFormat.of(tokenizer, package).encode(probe)
    except DataError:  # a template that refuses the probe: the data will say what it refuses
        return package
    trained = [t for t, keep in zip(row.ids, row.loss_mask) if keep]
    special = {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
    stops = list(package.generation.get("eos_token_ids", []))
    if not trained or trained[-1] not in special or trained[-1] in stops:
        return package
    logger.info("chat template: its turns end with %r, which the model's eos ids %s lack; generation stops there too",
                tokenizer.id_to_token(trained[-1]), stops)
    return dataclasses.replace(package, generation={**package.generation, "eos_token_ids": stops + [trained[-1]]})


class ChatRow(NamedTuple):
    """One conversation as training reads it."""

    ids: list[int]  # the rendered conversation's tokens
    loss_mask: list[int]  # 1 on the assistant tokens (answer + end-of-turn marker)
    prompt_len: int  # tokens of the last answer's prompt, as chat() tokenizes it
    answer: str  # the last assistant turn's content
    spans: list[tuple[int, int]]  # character spans of the assistant turns in `text`
    text: str  # the rendered conversation
    consistent: bool  # ids[:prompt_len] == the last prompt tokenized alone


@dataclass(frozen=True)
class ChatFormat:
    """A chat template with the variables and stop ids a package gives it, over a tokenizer."""

    tokenizer: Tokenizer
    template: str
    variables: Mapping[str, str]  # bos_token, eos_token, ...: what runtime/chat.py passes
    stop_ids: tuple[int, ...]  # generation ends at any of these

    @classmethod
    def of(cls, tokenizer: Tokenizer, package: PackageInfo) -> "ChatFormat":
        """The format of a package (chat_package's): the manifest's special tokens are the
        package's, else the tokenizer's by our names (export/exporter.py does the same)."""
        if package.chat_template is None:
            raise ConfigError("ChatFormat.of needs a package with a chat template (chat_package)")
        ids = dict(package.special_tokens) if package.special_tokens else special_token_ids(tokenizer)
        variables = special_token_variables(ids, tokenizer.id_to_token, package.chat_tokens)
        stops = tuple(package.generation.get("eos_token_ids") or [ids.get("eos", -1)])
        return cls(tokenizer, package.chat_template, variables, tuple(s for s in stops if s >= 0))

    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool) -> str:
        try:
            return render(self.template, [dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                          variables=self.variables)
        except InputError as err:  # the template's raise_exception (roles it refuses, ...)
            raise DataError(f"{err}; leave such conversations out of the data") from None

    def encode(self, example: ChatExample) -> ChatRow:
        messages = [{"role": m.role, "content": m.content} for m in example.messages]
        text = self.render(messages, add_generation_prompt=False)
        stop_texts = [t for t in (self.tokenizer.id_to_token(i) for i in self.stop_ids) if t]
        spans, prompt_text = [], ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt_text = self.render(messages[:i], add_generation_prompt=True)
            turn = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (turn.startswith(prompt_text) and text.startswith(turn)):
                raise DataError(
                    f"the chat template renders turn {i} (assistant) differently depending on the turns that follow, "
                    f"so its tokens cannot be told apart for the loss: messages[:{i}] with the generation prompt "
                    f"renders {prompt_text[-60:]!r}, which does not start the rendering of messages[:{i + 1}]; "
                    "fine-tune with a template that renders each turn the same in every prefix")
            content = message["content"].strip()
            found = turn.find(content, len(prompt_text))
            if found < 0:
                raise DataError(f"the chat template does not write assistant turn {i}'s content as it is (got "
                                f"{turn[len(prompt_text):][:60]!r} for {content[:60]!r})")
            end = found + len(content)
            tail = turn[end:]
            stops = [(tail.find(s), s) for s in stop_texts if tail.find(s) >= 0]
            end += min(stops)[0] + len(min(stops)[1]) if stops else len(tail.rstrip())
            spans.append((len(prompt_text), end))
        encoded = self.tokenizer.encode(text, add_special_tokens=False)
        mask = [int(any(s <= a and b <= e for s, e in spans)) for a, b in encoded.offsets]
        prompt = self.tokenizer.encode(prompt_text, add_special_tokens=False).ids
        ids = list(encoded.ids)
        return ChatRow(ids, mask, len(prompt), example.messages[-1].content, spans, text, ids[: len(prompt)] == prompt)


def chat_exact_match(model: Transformer, chat: ChatFormat, pad_id: int, prompts: Sequence[list[int]],
                     answers: Sequence[str], max_new_tokens: int) -> float:
    """Share of prompts (the last answer's prompt as chat() tokenizes it) whose greedy answer,
    stopped at the chat's stop ids and decoded without special tokens as the runtime decodes
    it, equals the expected answer (both stripped)."""
    config = GenerationConfig(strategy="greedy", max_new_tokens=max_new_tokens, eos_token_ids=chat.stop_ids,
                              pad_token_id=max(pad_id, 0))
    hits = 0
    with torch.no_grad():
        for start in range(0, len(prompts), 256):
            outputs = generate(model, list(prompts[start : start + 256]), config)
            for out, answer in zip(outputs, answers[start : start + 256]):
                hits += chat.tokenizer.decode(out[0], skip_special_tokens=True).strip() == answer.strip()
    return hits / max(1, len(prompts))


__all__ = [
    "CHAT_END", "CHAT_START", "CHAT_TOKENS", "DEFAULT_CHAT_TEMPLATE", "ChatFormat", "ChatRow", "chat_exact_match",
    "chat_package", "fallback_chat_template", "new_tokenizer_special_tokens", "tokenizer_texts",
]
