"""Conversations (lists of ``{"role", "content"}`` messages) as (prompt, response) text.

Two renderers turn messages into text:

- ``hf_renderer``: the checkpoint's own chat template (``transformers``' ``apply_chat_template``);
  ``renderer_for`` picks it for a tokenizer that has one (the Hugging Face backend's).
- ``PLAIN``, for every other tokenizer: the hh-rlhf layout the project's transcripts already use,

      {system}\\n\\nHuman: {user}\\n\\nAssistant: {assistant}\\n\\nHuman: ...

  A system message may only come first and is written bare at the very start (where Anthropic's
  text prompts put it); the generation prompt is "\\n\\nAssistant:".

``split_reply`` cuts a reply (assistant messages) from the conversation before it by rendering
twice: the prompt with the generation prompt, then the whole conversation without it; the response
is what the second adds to the first. With the plain template that is prompt "...\\n\\nAssistant:"
and response " {content}", leading space kept, exactly as ``split_transcript_pair`` cuts an
hh-rlhf transcript. A template whose prompt is not a prefix of the whole (one that renders earlier
turns differently once a reply follows, say by dropping reasoning) cannot be split: ``ChatError``.
A response's trailing EOS text is cut, because the stages append the EOS id themselves.

The readers in ``rlhf.data.jsonl`` validate the messages; this module only renders them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ASSISTANT", "HUMAN", "PLAIN", "ChatError", "Renderer", "hf_renderer", "plain_render", "renderer_for", "split_reply"]

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLES = ("system", "user", "assistant")

Messages = list[dict]


class ChatError(ValueError):
    """A conversation that cannot be rendered or split; the readers report it as a bad row."""


@dataclass(frozen=True)
class Renderer:
    """How messages become text: ``render(messages, add_generation_prompt) -> str``."""

    render: Callable[[Messages, bool], str]
    eos_text: str = ""  # cut from a response's end: the stages append the EOS id
    name: str = "the plain template"  # for error messages


def plain_render(messages: Messages, add_generation_prompt: bool) -> str:
    """The hh-rlhf layout (module docstring). Raises `ChatError` for a system message after the first."""
    parts = []
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system":
            if i:
                raise ChatError("the plain template takes a system message only as the first message")
            parts.append(content)
        else:
            parts.append(f"{HUMAN if role == 'user' else ASSISTANT} {content}")
    if add_generation_prompt:
        parts.append(ASSISTANT)
    return "".join(parts)


PLAIN = Renderer(plain_render)


def hf_renderer(hf_tokenizer) -> Renderer:
    """Render with a `transformers` tokenizer's chat template; its failures become `ChatError`."""
    import jinja2  # a dependency of transformers' chat templates, so present wherever they are

    def render(messages: Messages, add_generation_prompt: bool) -> str:
        try:
            return hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except (jinja2.TemplateError, ValueError) as err:  # raise_exception(...) in the template, an empty conversation
            raise ChatError(f"the chat template failed: {err}") from None

    return Renderer(render, eos_text=hf_tokenizer.eos_token or "", name="the chat template")


def renderer_for(tokenizer) -> Renderer:
    """The tokenizer's chat template if it has one (the hf backend's `HFTokenizer`), else `PLAIN`."""
    if getattr(tokenizer, "chat_template", None) and hasattr(tokenizer, "to_transformers"):
        return hf_renderer(tokenizer.to_transformers())
    return PLAIN


def split_reply(renderer: Renderer, prompt: Messages, reply: Messages) -> tuple[str, str]:
    """(prompt text, response text) for `reply` (assistant messages) answering `prompt` (messages).

    Raises `ChatError` when the rendered prompt is not a prefix of the rendered conversation, or
    the response is blank.
    """
    head = renderer.render(prompt, True)
    full = renderer.render(prompt + reply, False)
    if not full.startswith(head):
        raise ChatError(
            f"{renderer.name} does not render the prompt (with its generation prompt) as a prefix of the "
            "conversation with the reply, so the response cannot be cut from it; the template renders "
            "earlier turns, or the assistant's opening, differently once a reply follows"
        )
    response = full[len(head):]
    if renderer.eos_text:
        cut = response.rfind(renderer.eos_text)
        if cut >= 0 and not response[cut + len(renderer.eos_text):].strip():
            response = response[:cut]
    if not response.strip():
        raise ChatError(f"{renderer.name} renders the reply as an empty response")
    return head, response
