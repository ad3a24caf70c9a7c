"""A checkpoint's chat template: found where Hugging Face checkpoints keep it, rendered with jinja2
the way the model's authors wrote it to be rendered.

Chat templates are jinja2 programs written for transformers' renderer, so they are rendered in the
same kind of environment: sandboxed, `trim_blocks` and `lstrip_blocks` on, the loop-control
extension, a `tojson` filter that keeps non-ASCII text as is, and the `raise_exception` and
`strftime_now` globals. The context is `messages`, `add_generation_prompt`, the special tokens
named in tokenizer_config.json (`bos_token`, `eos_token`, ...) and any extra variables the caller
passes (`enable_thinking=False`, `tools=[...]`).

    template = ChatTemplate.from_checkpoint(ckpt_dir)
    text = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
"""
from __future__ import annotations

import json
import os

from .config_checks import ConfigError, describe, load_json_object

# Where a checkpoint keeps its template, in the order transformers prefers them.
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token",
                  "mask_token")


class ChatTemplateError(ValueError):
    """A chat template that cannot be found, compiled or rendered (the message names its file), or
    messages it cannot take."""


def _token_text(value):
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def find_chat_template(ckpt_dir) -> tuple[str, str] | None:
    """(template source, file it came from) of a checkpoint directory, or None where it has none.
    A file that exists but is malformed is a ChatTemplateError naming it."""
    ckpt_dir = os.fspath(ckpt_dir)
    for name in TEMPLATE_FILES:
        path = os.path.join(ckpt_dir, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".jinja"):
            try:
                with open(path, encoding="utf-8") as f:
                    return f.read(), path
            except UnicodeDecodeError as e:
                raise ChatTemplateError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from e
        try:
            data = load_json_object(path, name)
        except ConfigError as e:
            raise ChatTemplateError(str(e)) from e
        template = data.get("chat_template")
        if template is None:
            continue
        if isinstance(template, list):   # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
            if template is None:
                raise ChatTemplateError(f"{path}: field 'chat_template' lists templates "
                                        f"{sorted(map(str, named))} but none named 'default'")
        if not isinstance(template, str):
            raise ChatTemplateError(f"{path}: field 'chat_template' must be a string, got {describe(template)}")
        return template, path
    return None


def special_tokens(ckpt_dir) -> dict:
    """{"bos_token": "<s>", ...}: the special tokens tokenizer_config.json names (for templates that
    write them)."""
    path = os.path.join(os.fspath(ckpt_dir), "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    try:
        data = load_json_object(path, "tokenizer config")
    except ConfigError as e:
        raise ChatTemplateError(str(e)) from e
    out = {}
    for key in SPECIAL_TOKENS:
        text = _token_text(data.get(key))
        if text is not None:
            out[key] = text
    return out


def _environment():
    from datetime import datetime

    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise ChatTemplateError(f"the chat template refused the messages: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def check_messages(messages) -> list[dict]:
    """A list of {"role": str, "content": str or list of parts} dicts, else ValueError naming the
    first bad message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {describe(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), (str, list)):
            raise ValueError(f"message {i} must be a dict with a string 'role' and a string (or list) "
                             f"'content', got {describe(m)}")
    return [dict(m) for m in messages]


class ChatTemplate:
    """One compiled chat template. `origin` (the file it came from) names it in every error."""

    def __init__(self, source: str, *, origin: str = "chat template", special_tokens: dict | None = None):
        import jinja2

        if not isinstance(source, str):
            raise TypeError(f"the chat template source must be a string, got {type(source).__name__}")
        self.source, self.origin = source, origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{origin}: the chat template is not valid jinja2 "
                                    f"(line {e.lineno}: {e.message})") from e

    @classmethod
    def from_checkpoint(cls, ckpt_dir) -> "ChatTemplate | None":
        """The checkpoint's template (chat_template.jinja, chat_template.json or
        tokenizer_config.json's `chat_template`), or None where it has none."""
        found = find_chat_template(ckpt_dir)
        if found is None:
            return None
        source, origin = found
        return cls(source, origin=origin, special_tokens=special_tokens(ckpt_dir))

    def render(self, messages, *, add_generation_prompt: bool = True, **context) -> str:
        """The conversation as the model's prompt text. add_generation_prompt ends it with the
        opening of the assistant's turn (what a reply continues)."""
        import jinja2

        messages = check_messages(messages)
        variables = {**self.special_tokens, **context, "messages": messages,
                     "add_generation_prompt": bool(add_generation_prompt)}
        try:
            return self._template.render(**variables)
        except ChatTemplateError as e:
            raise ChatTemplateError(f"{self.origin}: {e}") from e
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatTemplateError(f"{self.origin}: rendering the chat template failed "
                                    f"({type(e).__name__}: {e})") from e


def apply_chat_template(ckpt_dir, messages, *, add_generation_prompt: bool = True, **context) -> str:
    """The rendered prompt text of `messages` with a checkpoint's template (ChatTemplateError where
    the checkpoint has none)."""
    template = ChatTemplate.from_checkpoint(ckpt_dir)
    if template is None:
        raise ChatTemplateError(f"{os.fspath(ckpt_dir)} has no chat template (looked for "
                                f"{', '.join(TEMPLATE_FILES[:2])} and a 'chat_template' field in "
                                f"{TEMPLATE_FILES[2]})")
    return template.render(messages, add_generation_prompt=add_generation_prompt, **context)
