"""The prompt format a model was trained with: one definition for training, export and runtimes.

A decoder trained with ``--task sft`` (or ``prefix-lm`` on seq2seq data) never saw a bare
source text: it saw ``"February 17, 2001 ="`` and learned to continue with
``" 2001-02-17"``. The format travels with the model, in the checkpoint's ``config.json``
(``ModelConfig.prompt_format``) and the package's ``manifest.json`` (``prompt_format``), and
every runtime applies it, so a user calls ``generate("February 17, 2001")`` and gets
``"2001-02-17"``, the text training scored::

    fmt = PromptFormat("{prompt} =")
    fmt.format("  February 17, 2001\\r\\n")   # "February 17, 2001 ="
    fmt.parse(" 2001-02-17")                  # "2001-02-17"

The rule, the same in Python and Node (runtime/node/manifest.js, model.js):

- ``format(prompt)``: the prompt's surrounding whitespace is stripped (``str.strip``: spaces,
  tabs, ``\\r``, ``\\n``; the training readers strip every field the same way), then it replaces
  the one ``{prompt}`` of ``template``. Only that placeholder is special: braces in the prompt
  or elsewhere in the template are kept as they are.
- ``parse(text)``: the continuation's surrounding whitespace is stripped (training's
  ``parse_continuation``). Inner whitespace and line endings are kept.

With ``strip`` false, both are the identity apart from the template. No format (a package
without ``prompt_format``, or ``raw=True``) means the prompt is tokenized exactly as given.
Torch-free: stdlib only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

from .errors import ConfigError, PackageError

PLACEHOLDER = "{prompt}"


@dataclass(frozen=True)
class PromptFormat:
    """``template`` holds ``{prompt}`` exactly once; ``strip`` strips the prompt and the output."""

    template: str
    strip: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or self.template.count(PLACEHOLDER) != 1:
            raise ConfigError(f"prompt_format template must be a string holding {PLACEHOLDER!r} exactly once; "
                             f"got {self.template!r:.80}")
        if not isinstance(self.strip, bool):
            raise ConfigError(f"prompt_format strip must be true or false; got {self.strip!r:.40}")

    def format(self, prompt: str) -> str:
        """The text the model reads for a user's ``prompt``."""
        before, after = self.template.split(PLACEHOLDER)
        return before + (prompt.strip() if self.strip else prompt) + after

    def parse(self, text: str) -> str:
        """The answer a user gets from the generated continuation ``text``."""
        return text.strip() if self.strip else text

    def parse_stream(self, pieces: Iterable[str]) -> Iterator[str]:
        """``parse`` on a stream of text deltas: leading whitespace dropped, whitespace held back
        until more text follows it (so a trailing run is never sent). ``"".join`` of the result
        equals ``parse("".join(pieces))``."""
        if not self.strip:
            yield from pieces
            return
        started, held = False, ""
        for piece in pieces:
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            text = held + piece
            body = text.rstrip()
            held = text[len(body):]
            if body:
                yield body

    def to_dict(self) -> dict[str, Any]:
        return {"template": self.template, "strip": self.strip}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PromptFormat":
        """From a JSON object; a ConfigError names what is wrong."""
        if not isinstance(data, Mapping) or "template" not in data or "strip" not in data:
            raise ConfigError(f"prompt_format must be a JSON object with fields template and strip; got {data!r:.80}")
        return cls(data["template"], data["strip"])


def from_manifest(value: Any) -> PromptFormat | None:
    """The manifest's ``prompt_format`` (absent or null: None, the prompt is raw text)."""
    if value is None:
        return None
    try:
        return PromptFormat.from_dict(value)
    except ConfigError as err:
        raise PackageError(f"manifest {err}. Re-export the package", code="E_MANIFEST") from None


# What ``--task sft`` and ``--task prefix-lm`` on seq2seq data train with (modeling/data.py).
SEQ2SEQ_PROMPT_FORMAT = PromptFormat("{prompt} =", strip=True)

__all__ = ["PLACEHOLDER", "PromptFormat", "SEQ2SEQ_PROMPT_FORMAT", "from_manifest"]
