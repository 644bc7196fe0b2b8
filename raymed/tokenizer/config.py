"""`model.add_tokens`: task tokens added to the tokenizer (re-exported from raymed.config).

An entry is a string, or `{content: ..., special: true}`: the shape of Hugging Face's
`tokenizers.AddedToken(content, special=...)`, which `tokenizer.add_tokens` takes, so one
ordered list gives every token its id in the order written. A plain added token is matched
whole and kept in decoded text; a special one is also dropped by
`decode(skip_special_tokens=True)` (so a served answer never shows it).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, model_validator


class TaskToken(BaseModel):
    """One token to add: its text, and whether it is special."""

    model_config = ConfigDict(extra="forbid")

    content: str
    special: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value):
        return {"content": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _not_blank(self) -> TaskToken:
        if not self.content.strip():
            raise ValueError(f"a task token must have visible text, got {self.content!r}")
        return self


def check_task_tokens(tokens: list[TaskToken]) -> list[TaskToken]:
    """The list unchanged; a ValueError naming a token given twice."""
    seen = set()
    for token in tokens:
        if token.content in seen:
            raise ValueError(f"{token.content!r} is given twice")
        seen.add(token.content)
    return tokens
