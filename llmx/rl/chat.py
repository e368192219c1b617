"""Dialogues as token ids with the agent's turns marked: what every rl loss trains on.

`render(tok, messages)` returns the token ids of the whole chat-templated dialogue and, for each token, the
1-based index of the agent turn it belongs to (0: not a target). A turn's tokens are everything the model has
to produce for it: the message text and the template's end-of-turn tokens, i.e. the text between the
generation prompt that precedes the turn and the start of the next message. This is the multi-segment mask
of the SWEET-RL reference's `--response_template` (every assistant span, user turns excluded), computed from
the template itself rather than from a header string, so it holds for any template that renders a dialogue's
prefix as a prefix of the whole (every common one does; a template that does not gets a clear error).

`tiny_chat_template()` is the template llmx gives the tokenizers it trains for small from-scratch policies.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from llmx.utils import LlmxError

Message = Dict[str, str]

TINY_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_chat_template() -> str:
    return TINY_TEMPLATE


def _text(tok, messages: Sequence[Message], generation_prompt: bool) -> str:
    return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def turn_spans(tok, messages: Sequence[Message]) -> Tuple[str, List[Tuple[int, int]]]:
    """The dialogue's text and the character span of each assistant turn (in order)."""
    full = _text(tok, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _text(tok, messages[:i], True)
        upto = _text(tok, messages[: i + 1], False)
        if not (full.startswith(upto) and upto.startswith(head)):
            raise LlmxError(
                "the tokenizer's chat template does not render a dialogue's prefix as a prefix of the whole "
                "dialogue, so agent turns cannot be located in it; use a template that does"
            )
        spans.append((len(head), len(upto)))
    return full, spans


def render(tok, messages: Sequence[Message], system: Optional[str] = None) -> Tuple[List[int], List[int]]:
    """(ids, segments) of a dialogue, with `system` as its first message when given."""
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    text, spans = turn_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    segments = [0] * len(enc["input_ids"])
    k = 0
    for j, (start, _) in enumerate(enc["offset_mapping"]):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k < len(spans) and start >= spans[k][0]:
            segments[j] = k + 1
    return list(enc["input_ids"]), segments


def prompt_ids(tok, messages: Sequence[Message], system: Optional[str] = None) -> List[int]:
    """Token ids of the model input that asks for the next agent turn."""
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    return list(tok(_text(tok, messages, True), add_special_tokens=False)["input_ids"])


def with_training_info(system: Optional[str], ground_truth: str, template: str) -> str:
    """The critic's system message: the agent's, plus the training-time information c (the hidden reference
    solution), which the actor never sees (paper §4.2; the reference prefixes "In light that the final answer
    is: {c}." to the dialogue)."""
    info = template.format(ground_truth=ground_truth)
    return f"{system}\n\n{info}" if system else info


def check_messages(messages: Any, where: str) -> List[Message]:
    if not isinstance(messages, list) or not messages:
        raise LlmxError(f"{where}: dialogue_history must be a non-empty list of messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            raise LlmxError(f"{where}: dialogue_history[{j}] must be {{'role': 'user'|'assistant', 'content': str}}, "
                            f"got {str(m)[:80]!r}")
    return messages
