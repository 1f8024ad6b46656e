"""Chat templates and tokenization: prompts for generation, and SFT examples with response-only labels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE = -100


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def format_prompt(tokenizer: Any, prompt: str | list[dict[str, str]]) -> str:
    """The text the model continues: the chat template with a generation prompt, or the raw prompt."""
    if has_chat_template(tokenizer):
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return render(tokenizer, msgs, add_generation_prompt=True)
    if isinstance(prompt, list):
        return "\n".join(m["content"] for m in prompt) + "\n"
    return prompt


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` (special tokens are written in the text by the template, never added twice)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt tokens, the token id on trained (assistant) tokens


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], max_length: int) -> Example:
    """Tokens of a chat, with labels on the assistant answers only; each answer ends with EOS, inside the loss."""
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = format_prompt(tokenizer, messages[:i]) if i else ""
        prompt_part = prefix[len(done) :] if prefix.startswith(done) else prefix
        answer = _answer_text(tokenizer, messages[: i + 1], prefix)
        p_ids, a_ids = encode(tokenizer, prompt_part), encode(tokenizer, answer)
        ids += p_ids + a_ids
        labels += [IGNORE] * len(p_ids) + a_ids
        done = prefix + answer
    return Example(ids[:max_length], labels[:max_length])


def _answer_text(tokenizer: Any, messages: list[dict[str, str]], prefix: str) -> str:
    """The assistant's text as the template writes it, cut right after its EOS token."""
    eos = tokenizer.eos_token
    if has_chat_template(tokenizer):
        full = render(tokenizer, messages, add_generation_prompt=False)
        if full.startswith(prefix):
            tail = full[len(prefix) :]
            cut = tail.find(eos, len(messages[-1]["content"]))
            if cut >= 0:
                return tail[: cut + len(eos)]
            return tail + eos
    return messages[-1]["content"] + eos
