"""One validated row of a data file, as every later step sees it (ideal.data.rows makes them,
ideal.data.tokens turns them into token ids and labels)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: What a bad row does: stop with its file, line and reason, or be skipped and counted.
OnInvalid = Literal["error", "skip"]


@dataclass(frozen=True)
class Example:
    """One validated row: its conversation, optional answer, where it came from."""

    messages: tuple[dict[str, str], ...]
    answer: str | None
    source: str  # "path:line" (JSON Lines) or "path[index]" (other kinds of file)
    raw: str  # the row's JSON text (one line, as read for JSON Lines): mixtures write it back

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The conversation up to (excluding) its last assistant turn: what generation conditions on."""
        last = max(i for i, m in enumerate(self.messages) if m["role"] == "assistant")
        return list(self.messages[:last])

    @property
    def completion(self) -> str:
        """The content of the last assistant turn."""
        return next(m["content"] for m in reversed(self.messages) if m["role"] == "assistant")
