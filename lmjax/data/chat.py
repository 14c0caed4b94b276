"""The chat template, and the records of SFT (chats) and DPO (preference pairs).

A conversation is rendered message by message as `<role marker> content <end_of_turn>` (markers
from the `chat` config section, whole reserved pieces of the tokenizer), with no text between
turns. The model learns the assistant's turns: their content tokens and the end-of-turn marker
that closes them, so generation stops at `end_of_turn`. A prompt for generation is the user turn
followed by the assistant marker (`ChatTemplate.prompt_ids`); a response is its content plus
end-of-turn (`ChatTemplate.response_ids`), so prompt + response is exactly the rendered
conversation of SFT and DPO.

Records (JSONL, one object per line; a malformed one is an error naming file, line and key):
- SFT: `{"prompt": ..., "response": ...}` (a user and an assistant message) or
  `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}` with at least one
  assistant message; keys from the `sft` section.
- DPO: `{"prompt": ..., "chosen": ..., "rejected": ...}`; keys from the `dpo` section.
Responses (assistant messages, chosen, rejected) may not be empty: there would be nothing to learn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lmjax.config import ChatConfig, DPOConfig, SFTConfig
from lmjax.data.corpus import DataError
from lmjax.data.examples import JSON_TYPES, string_field
from lmjax.data.tokenizer import Tokenizer, TokenizerError

ROLES = ("system", "user", "assistant")


class ChatTemplate:
    """Token ids of the chat markers of `settings` in `tokenizer`, and the rendering above."""

    def __init__(self, settings: ChatConfig, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        ids = {}
        for key in (*ROLES, "end_of_turn"):
            piece = getattr(settings, key)
            token_id = tokenizer.piece_id(piece)
            if token_id is None:
                raise TokenizerError(
                    f"chat.{key}: {piece!r} is not a piece of tokenizer {tokenizer.path}; reserve the chat markers in "
                    "data.tokenizer.special_tokens (the default does) and train the tokenizer (and the model) with them"
                )
            ids[key] = token_id
        self.role_ids = {role: ids[role] for role in ROLES}
        self.end_id: int = ids["end_of_turn"]  # where generation stops

    def encode(self, messages: list[tuple[str, str]], contents: list[list[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, weights) of a conversation: weight 1 on the assistant's content and
        end-of-turn tokens, 0 elsewhere. `contents` are the messages' tokens when already encoded."""
        if contents is None:
            contents = self.tokenizer.encode_batch([content for _, content in messages])
        ids, weights = [], []
        for (role, _), content in zip(messages, contents):
            trained = int(role == "assistant")
            ids += [self.role_ids[role], *content, self.end_id]
            weights += [0] + [trained] * (len(content) + 1)
        return np.asarray(ids, np.int32), np.asarray(weights, np.uint8)

    def prompt_ids(self, prompt: str) -> list[int]:
        """The user turn, then the assistant marker: what a chat model continues."""
        return [self.role_ids["user"], *self.tokenizer.encode(prompt), self.end_id, self.role_ids["assistant"]]

    def response_ids(self, response: str) -> list[int]:
        return [*self.tokenizer.encode(response), self.end_id]

    def response_text(self, ids: list[int]) -> str:
        """Generated ids after the prompt -> the response text (up to end-of-turn or eos)."""
        for stop in (self.end_id, self.tokenizer.eos_id):
            if stop in ids:
                ids = ids[: ids.index(stop)]
        return self.tokenizer.decode(ids)


@dataclass(frozen=True)
class Chat:
    """An SFT example: its messages as (role, content)."""

    name: str  # "file:LINE", the file relative to the folder holding all files of its set
    where: str  # "path:LINE" as given, for errors
    messages: tuple[tuple[str, str], ...]
    key: str  # the record key holding the prompt (sft.prompt_key or sft.messages_key), for errors

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(f"{role}\0{content}" for role, content in self.messages)

    @property
    def prompt(self) -> str:
        """The text before the first assistant message: examples sharing it share a split."""
        first = next(i for i, (role, _) in enumerate(self.messages) if role == "assistant")
        return "\0".join(self.texts[:first])


def sft_expected(settings: SFTConfig) -> str:
    return (f"a JSON object with string fields '{settings.prompt_key}' and '{settings.response_key}' (sft.prompt_key, "
            f"sft.response_key), or '{settings.messages_key}' (sft.messages_key): a list of {{\"role\", \"content\"}} objects")


def parse_chat(record: dict, where: str, name: str, settings: SFTConfig) -> Chat:
    expected = sft_expected(settings)
    key = settings.messages_key
    if key not in record:
        prompt = string_field(record, settings.prompt_key, "sft.prompt_key", where, expected)
        response = string_field(record, settings.response_key, "sft.response_key", where, expected, non_empty=True)
        return Chat(name, where, (("user", prompt), ("assistant", response)), settings.prompt_key)
    messages = record[key]
    if not isinstance(messages, list) or not messages:
        what = "an empty list" if messages == [] else JSON_TYPES.get(type(messages), "a value")
        raise DataError(f"{where}: key '{key}' (sft.messages_key) holds {what}; expected a non-empty list of {{\"role\", \"content\"}} objects")
    parsed = []
    for i, message in enumerate(messages):
        at = f"{where}: key '{key}' (sft.messages_key), message {i}"
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or message.get("role") not in ROLES:
            raise DataError(f"{at}: expected {{\"role\": one of {', '.join(ROLES)}, \"content\": a string}}, got {str(message)[:80]}")
        if message["role"] == "assistant" and not message["content"].strip():
            raise DataError(f"{at}: the assistant's content is empty; every response needs text to learn")
        parsed.append((message["role"], message["content"]))
    if all(role != "assistant" for role, _ in parsed):
        raise DataError(f"{where}: key '{key}' (sft.messages_key) has no assistant message; SFT learns the assistant's turns")
    return Chat(name, where, tuple(parsed), key)


@dataclass(frozen=True)
class Preference:
    """A DPO example: a prompt and two responses, the preferred one first."""

    name: str
    where: str
    prompt: str
    chosen: str
    rejected: str

    @property
    def texts(self) -> tuple[str, str, str]:
        return self.prompt, self.chosen, self.rejected


def preference_expected(settings: DPOConfig) -> str:
    keys = ", ".join(f"'{getattr(settings, k)}'" for k in ("prompt_key", "chosen_key", "rejected_key"))
    return f"a JSON object with string fields {keys} (dpo.prompt_key, dpo.chosen_key, dpo.rejected_key)"


def parse_preference(record: dict, where: str, name: str, settings: DPOConfig) -> Preference:
    expected = preference_expected(settings)
    prompt = string_field(record, settings.prompt_key, "dpo.prompt_key", where, expected)
    chosen = string_field(record, settings.chosen_key, "dpo.chosen_key", where, expected, non_empty=True)
    rejected = string_field(record, settings.rejected_key, "dpo.rejected_key", where, expected, non_empty=True)
    return Preference(name, where, prompt, chosen, rejected)
