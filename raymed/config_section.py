"""The base of every config section (its own module so that section modules such as
raymed/train_config.py and raymed/config.py can share it without importing each other)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section: unknown fields are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
