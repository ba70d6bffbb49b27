"""Chat templates: a package's `chat_template` (the Jinja template a Hugging Face model ships in
`tokenizer_config.json` or `chat_template.jinja`) rendered as transformers'
`tokenizer.apply_chat_template` renders it (runtime/FORMAT.md 5.3):

* an ImmutableSandboxedEnvironment (a template is untrusted code) with `trim_blocks` and
  `lstrip_blocks`, the `loopcontrols` extension and `{% generation %}` blocks rendered as is;
* `raise_exception(message)`, `strftime_now(format)` and a `tojson` filter that writes
  `json.dumps(..., ensure_ascii=False)` (Jinja's own escapes HTML);
* the variables `messages`, `add_generation_prompt`, and `bos_token`, `eos_token`, ... : the
  manifest's `chat_tokens` (the tokenizer's named tokens, transformers' `special_tokens_map`),
  else the tokenizer's token of each special-token role the package has.

The rendered text already holds the template's special tokens (a Llama-3 template writes
`<|begin_of_text|>` itself), so it is tokenized WITHOUT the tokenizer's special-token template:
adding it again would give a second BOS.

jinja2 is an optional dependency (`pip install 'onnxformer[chat]'`), imported on first use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from .errors import ConfigError, InputError, PackageError

CHAT_EXTRA = "pip install 'onnxformer[chat]'"
ROLES_AS_VARIABLES = ("bos", "eos", "unk", "pad", "sep", "cls", "mask")  # -> bos_token, eos_token, ...


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: the text the template wrote and its token ids (no special
    tokens added by the tokenizer: the template wrote those it wants)."""

    text: str
    token_ids: list[int]


def check_messages(messages: Any) -> list[dict[str, str]]:
    """A conversation: a non-empty list of {"role": str, "content": str} (other keys, strings
    too, pass through to the template, e.g. "name"). Returns plain copies."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError(f"chat messages must be a list of {{'role': ..., 'content': ...}} objects; got "
                         f"{type(messages).__name__}. For one user message pass [{{'role': 'user', 'content': text}}]")
    if not messages:
        raise InputError("chat messages: the list is empty; pass at least one message "
                         "({'role': 'user', 'content': text})")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"chat messages[{i}] must be an object {{'role': ..., 'content': ...}}; got "
                             f"{type(message).__name__} ({message!r:.60})")
        for key in ("role", "content"):
            if key not in message:
                raise InputError(f"chat messages[{i}] has no {key!r}; each message needs 'role' and 'content'")
        for key, value in message.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InputError(f"chat messages[{i}].{key} must be a string; got {type(value).__name__} "
                                 f"({value!r:.60})")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise InputError(f"chat messages[{i}].{key} is not valid Unicode ({err.reason} at character "
                                 f"{err.start}); decode the bytes it came from with errors='replace'") from None
        if not message["role"]:
            raise InputError(f"chat messages[{i}].role is empty; pass 'system', 'user' or 'assistant'")
        out.append(dict(message))
    return out


def _jinja():
    try:  # an optional dependency of the runtime (the [chat] extra), imported on first use
        import jinja2
        import jinja2.ext
        import jinja2.sandbox
    except ImportError:
        raise ConfigError(f"chat templates need jinja2, which is not installed: {CHAT_EXTRA}") from None
    version = tuple(int(p) if p.isdigit() else 0 for p in jinja2.__version__.split(".")[:3])
    if version < (3, 1, 6):  # a template is untrusted code; older sandboxes have known escapes
        raise ConfigError(f"chat templates need jinja2 >= 3.1.6 (older sandboxes have known escapes); this is "
                          f"{jinja2.__version__}: pip install -U 'onnxformer[chat]'")
    return jinja2, jinja2.sandbox, jinja2.ext


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=8)
def compile_template(template: str) -> Any:
    """The compiled template; a template that does not parse is the package's fault (E_MANIFEST)."""
    jinja2, sandbox, ext = _jinja()

    class Generation(ext.Extension):  # `{% generation %}...{% endgeneration %}` marks assistant text: kept as is
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[Generation, ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise PackageError(f"the package's chat_template is not a valid Jinja template ({err.message}, line "
                           f"{err.lineno}); re-export the package from a model with a working template",
                           code="E_MANIFEST") from None


def render(template: str, messages: list[dict[str, str]], *, add_generation_prompt: bool,
           variables: Mapping[str, str]) -> str:
    """The template rendered for `messages` (checked by check_messages)."""
    compiled = compile_template(template)
    jinja2, _, _ = _jinja()
    try:
        return compiled.render(**variables, messages=messages, add_generation_prompt=add_generation_prompt,
                               tools=None, documents=None)
    except jinja2.TemplateError as err:  # raise_exception(...) of the template, or a sandbox refusal
        raise InputError(f"the package's chat template refused the conversation: {err}") from None


def special_token_variables(special_tokens: Mapping[str, int], id_to_token,
                            chat_tokens: Mapping[str, str] | None = None) -> dict[str, str]:
    """`bos_token`, `eos_token`, ...: the manifest's `chat_tokens` (the tokenizer's names, as
    transformers passes them), else the token of each role the package has (id >= 0)."""
    out = {}
    for role in ROLES_AS_VARIABLES:
        token_id = special_tokens.get(role, -1)
        token = id_to_token(token_id) if token_id >= 0 else None
        if token is not None:
            out[f"{role}_token"] = token
    return {**out, **(chat_tokens or {})}


__all__ = ["CHAT_EXTRA", "ChatPrompt", "check_messages", "compile_template", "render", "special_token_variables"]
