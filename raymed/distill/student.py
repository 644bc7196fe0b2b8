"""The teacher and the student of a distillation: the teacher resolved and pinned to its
directory, the student taken from the teacher's layers (or the `model` section, with the
teacher's vocabulary checked), and the config the run trains with."""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path

import torch

from raymed.config import Config, with_values
from raymed.errors import RaymedError
from raymed.registry import VERSION, Registry
from raymed.train.model import decoder_layers, load_tokenizer

RUN_SUFFIX = "-distill"
"""A distillation of run `r` lives in `runs/r-distill/` (its student, checkpoints and gate),
apart from `r`'s fine-tune: a rerun resumes the distillation, never the fine-tune."""
STUDENT_DIR = "student"
"""Where, under the distillation's run directory, a student taken from the teacher's layers is written."""


def prepare_run(config: Config) -> Config:
    """The config a distillation trains with: `distill.teacher` pinned to the teacher's
    directory (resolved once, here, so every worker and every retry uses the same one),
    `model` naming the student (with `distill.student_layers`, the directory
    `runs/<run_name>-distill/student/`, in place of the model section's name, init,
    architecture and tokenizer), `registry.name` the student's own and `run_name` the
    distillation's (RUN_SUFFIX)."""
    from transformers import AutoTokenizer

    distill = config.distill
    if config.model.add_tokens:
        raise RaymedError("model.add_tokens adds tokens the teacher has no distribution over: distill with the "
                          "teacher's vocabulary (add task tokens when fine-tuning the student afterwards)")
    teacher = resolve_teacher(config)
    values = {"distill.teacher": str(teacher), "registry.name": distill.registry_name or f"{config.registry.name}-small",
              "run_name": config.run_name + RUN_SUFFIX}
    if distill.student_layers is not None:  # the student replaces the model section's model
        student = write_layer_student(teacher, distill.student_layers, distill_dir(config) / STUDENT_DIR)
        values |= {"model.name": str(student), "model.init": "pretrained", "model.architecture": {},
                   "model.tokenizer": None}
    else:
        check_same_vocabulary(AutoTokenizer.from_pretrained(teacher), load_tokenizer(config.model), teacher)
    return with_values(config, values)


def distill_dir(config: Config) -> Path:
    """Where a distillation of `config`'s run lives: `runs/<run_name>-distill/`."""
    from raymed.pipeline import run_dir

    return run_dir(config).with_name(config.run_name + RUN_SUFFIX)


def resolve_teacher(config: Config) -> Path:
    """The teacher's model directory: `current` or `vN` of the registry `registry.name`
    (the base model registered as v1 on first use), else a cached model, a directory or a
    training checkpoint."""
    from raymed.assets import resolve_pretrained
    from raymed.eval import resolve_model_dir
    from raymed.promote import resolve_current

    teacher = config.distill.teacher
    if teacher == "current":
        return resolve_current(config)
    if VERSION.match(teacher):
        return Registry.for_config(config).path(teacher)
    return resolve_model_dir(resolve_pretrained(teacher)).resolve()


def check_same_vocabulary(teacher_tokenizer, student_tokenizer, teacher: Path) -> None:
    """Refuse a student whose tokenizer maps any token to another id than the teacher's:
    their next-token distributions are compared id by id."""
    theirs, ours = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if theirs == ours:
        return
    differing = [t for t in theirs.keys() | ours.keys() if theirs.get(t) != ours.get(t)]
    token = min(differing, key=lambda t: min(theirs.get(t, len(theirs)), ours.get(t, len(ours))))
    raise RaymedError(
        f"the student's tokenizer is not the teacher's ({teacher}): {len(ours)} tokens against {len(theirs)}, and "
        f"{token!r} is id {ours.get(token)} in the student's but {theirs.get(token)} in the teacher's. Distillation "
        f"compares the two models' next-token distributions id by id: give the student the teacher's tokenizer "
        f"(model.tokenizer: {teacher}), or take the student from the teacher (distill.student_layers)")


def extract_layers(teacher, layers: list[int]):
    """A model of the teacher's architecture with only `layers` of its decoder layers, in
    order, and its embeddings, final norm and output head: every weight copied from the
    teacher (the initialisation of DistilBERT, Sanh et al. 2019, which kept one layer in two)."""
    from transformers import AutoModelForCausalLM

    stack = decoder_layers(teacher)
    if layers[-1] >= len(stack):
        raise RaymedError(f"distill.student_layers names layer {layers[-1]}, but the teacher has {len(stack)} "
                          f"decoder layers (0-{len(stack) - 1})")
    config = copy.deepcopy(teacher.config)
    text = config.get_text_config()
    text.num_hidden_layers = len(layers)
    if isinstance(getattr(text, "layer_types", None), list):  # per-layer attention kinds
        text.layer_types = [text.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config, dtype=teacher.dtype)
    prefix = next(name for name, module in teacher.named_modules() if module is stack) + "."
    student.load_state_dict(renamed_layers(teacher.state_dict(), prefix, layers), strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student


def renamed_layers(state: dict[str, torch.Tensor], prefix: str, layers: list[int]) -> dict[str, torch.Tensor]:
    """`state` with the kept layers renumbered 0, 1, ... under `prefix` (`model.layers.`),
    the other layers' tensors left out and everything outside the stack kept."""
    position = {old: new for new, old in enumerate(layers)}
    kept = {}
    for name, tensor in state.items():
        if not name.startswith(prefix):
            kept[name] = tensor
            continue
        index, rest = name[len(prefix):].split(".", 1)
        if int(index) in position:
            kept[f"{prefix}{position[int(index)]}.{rest}"] = tensor
    return kept


def write_layer_student(teacher_dir: Path, layers: list[int], out: Path) -> Path:
    """The student taken from the teacher's `layers`, saved with the teacher's tokenizer as a
    Hugging Face directory at `out` (built beside it, then renamed into place)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32, use_safetensors=True)
    student = extract_layers(teacher, layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".student-", dir=out.parent))
    student.save_pretrained(staging)
    AutoTokenizer.from_pretrained(teacher_dir).save_pretrained(staging)
    if out.exists():
        shutil.rmtree(out)
    os.rename(staging, out)
    return out


def load_teacher(directory: str, device: torch.device):
    """The frozen teacher on `device`: eval mode, no parameter needing a gradient, bf16 on a
    GPU (fp32 on CPU)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, use_safetensors=True)
    return teacher.requires_grad_(False).eval().to(device)
