"""The `distill` section of the config: a frozen teacher's next-token distributions taught
to a smaller student (its own module; `from raymed.config import DistillConfig` works too)."""

from __future__ import annotations

from pydantic import Field, field_validator

from raymed.config_section import Section


class DistillConfig(Section):
    """`raymed distill`: the teacher, the student, and how the two losses mix."""

    teacher: str = "current"
    """`current` or `vN`: a version of the registry `registry.name`; or a model in
    RAYMED_CACHE/models, a Hugging Face directory or a training checkpoint."""
    student_layers: list[int] | None = None
    """The teacher's decoder layers the student keeps, by index (e.g. [0, 2, 4, ...]: every
    other one), with the teacher's embeddings, final norm and head. Unset: the student is
    the `model` section (a directory, cached model or `init: scratch` architecture) with
    the teacher's tokenizer."""
    alpha: float = Field(0.5, ge=0, le=1)
    """The loss is (1 - alpha)·CE + alpha·T²·KL(teacher ‖ student); 0: cross-entropy alone."""
    temperature: float = Field(2.0, gt=0)
    """T: both distributions are softened by it before the KL (Hinton et al., 2015)."""
    registry_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """The student's own registry model; unset: `<registry.name>-small`."""

    @field_validator("student_layers")
    @classmethod
    def _increasing(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and (not layers or layers[0] < 0 or any(b <= a for a, b in zip(layers, layers[1:]))):
            raise ValueError(f"give increasing, distinct teacher layer indices from 0, e.g. [0, 2, 4] (got {layers})")
        return layers
