"""Checkpoint I/O. A checkpoint is a Hugging Face directory (`from_pretrained` loads it as
it is, tokenizer included) plus `optimizer.pt` / `scheduler.pt` (tensors only, loaded with
`weights_only=True`), `trainer_state.json` (step, data position, and the step the writing
attempt started from) and, written last, `raymed_complete.json`: every other file's size
and SHA-256. Under `train.strategy: fsdp` the model and optimizer state are DCP shards in
`sharded/` instead of `optimizer.pt` (raymed/train/fsdp.py); the mark lists them too.

The completion mark closes a window Ray Train leaves open: a worker killed after its
checkpoint reached storage but before the controller registered it would make the run
redo those steps. A directory whose mark verifies is complete whatever Ray knows of it,
so a restart resumes from the newest such checkpoint; a half-written one (no mark, or a
file that does not match it) is never used.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch

from raymed.errors import RaymedError
from raymed.registry import file_sha256

STATE_FILE = "trainer_state.json"
ADAPTER_DIR = "adapter"
COMPLETE_FILE = "raymed_complete.json"


def save_checkpoint_model(model, tokenizer, out: Path) -> None:
    """A directory `from_pretrained` loads as it is; for LoRA the merged weights, with the
    adapter alone beside them in `adapter/` (what trains only: not the embedding that task
    tokens resized, which resume rebuilds and the merged weights hold)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.save_pretrained(out / ADAPTER_DIR, save_embedding_layers=False)
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def write_checkpoint(out: Path, model, tokenizer, optimizer, scheduler, state: dict) -> None:
    """Every file of a checkpoint into `out`, the completion mark last."""
    save_checkpoint_model(model, tokenizer, out)
    torch.save(optimizer.state_dict(), out / "optimizer.pt")
    write_training_state(out, scheduler, state)
    mark_complete(out, state["step"])


def write_training_state(out: Path, scheduler, state: dict) -> None:
    torch.save(scheduler.state_dict(), out / "scheduler.pt")
    (out / STATE_FILE).write_text(json.dumps(state))


def file_entries(directory: Path) -> dict[str, dict]:
    """Every file below `directory` (by relative path): its size and SHA-256."""
    return {str(p.relative_to(directory)): _file_entry(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def mark_complete(out: Path, step: int, elsewhere: dict[str, dict] | None = None) -> None:
    """Write the completion mark: the files in `out`, plus `elsewhere`'s entries (files other
    ranks write into the same checkpoint, which reaches storage as one directory)."""
    files = {**(elsewhere or {}), **file_entries(out)}
    (out / COMPLETE_FILE).write_text(json.dumps({"step": step, "files": files}))


def complete_step(directory: Path) -> int | None:
    """The step of a checkpoint whose completion mark verifies (every file it lists is
    there with its size and checksum), else None."""
    mark = _read_mark(directory)
    if mark is None:
        return None
    for name, expected in mark["files"].items():
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
            return None
    return mark["step"]


def check_files(directory: Path, under: str) -> None:
    """Raise naming the first file below `directory / under` that the completion mark lists
    but that is missing or differs from it in size or SHA-256 (or when there is no mark)."""
    mark = _read_mark(directory)
    if mark is None:
        raise RaymedError(f"checkpoint {directory} has no readable {COMPLETE_FILE}: it was never completely written")
    listed = {name: entry for name, entry in mark["files"].items() if Path(name).parts[0] == under}
    if not listed:
        raise RaymedError(f"checkpoint {directory} lists no files in {under}/ ({COMPLETE_FILE})")
    for name, expected in sorted(listed.items()):
        path = directory / name
        if not path.is_file() or path.stat().st_size != expected["size"] or file_sha256(path) != expected["sha256"]:
            raise RaymedError(f"checkpoint file {path} is damaged or missing (it does not match {COMPLETE_FILE}): "
                              "delete that checkpoint to resume from the one before")


def newest_complete(run_dir: Path, after_step: int) -> tuple[Path, int] | None:
    """The complete checkpoint under `run_dir` with the highest step beyond `after_step`
    (only those are checksummed)."""
    marked = [(mark["step"], path) for path in run_dir.glob("checkpoint_*")
              if (mark := _read_mark(path)) is not None and mark["step"] > after_step]
    for step, path in sorted(marked, reverse=True):
        if complete_step(path) == step:
            return path, step
    return None


def _read_mark(directory: Path) -> dict | None:
    """A checkpoint's completion mark ({"step", "files"}), or None when it has none."""
    try:
        mark = json.loads((directory / COMPLETE_FILE).read_text())
        return {"step": int(mark["step"]), "files": dict(mark["files"])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_unregistered(run_dir: Path, registered: set[str]) -> list[Path]:
    """Delete the complete checkpoints Ray Train does not track (one a restart resumed from
    before Ray registered it), so only its top-K stay on disk; the removed paths."""
    strays = [p for p in run_dir.glob("checkpoint_*") if p.is_dir() and (p / COMPLETE_FILE).is_file()
              and str(p.resolve()) not in registered]
    for path in strays:
        shutil.rmtree(path, ignore_errors=True)
    return strays


def load_checkpoint_model(model, directory: Path) -> None:
    """Load a checkpoint's weights (safetensors only) into the model being trained. Every
    tensor must match: a missing or unexpected one is an error naming it."""
    from peft import PeftModel, set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file, load_model

    lora = isinstance(model, PeftModel)
    path = directory / ADAPTER_DIR / "adapter_model.safetensors" if lora else directory / "model.safetensors"
    try:
        if lora:
            result = set_peft_model_state_dict(model, load_file(path))
            missing = [k for k in result.missing_keys if "lora_" in k]
            unexpected = result.unexpected_keys
        else:
            missing, unexpected = load_model(model, path, strict=False)
    except (OSError, SafetensorError) as err:
        raise RaymedError(f"checkpoint file {path} is unreadable ({err}): "
                          "delete that checkpoint to resume from the one before") from None
    if missing or unexpected:
        problems = [f"missing {', '.join(sorted(missing))}" if missing else "",
                    f"unexpected {', '.join(sorted(unexpected))}" if unexpected else ""]
        raise RaymedError(f"checkpoint file {path} does not match the model being trained "
                          f"({'; '.join(filter(None, problems))}): resume with the model that wrote it")


def load_tensors(path: Path):
    """A checkpoint's optimizer or scheduler state: tensors and plain containers only."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as err:  # torch raises several kinds for a damaged file
        raise RaymedError(f"checkpoint file {path} is unreadable ({err}): "
                          "delete that checkpoint to resume from the one before") from None


def _file_entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}
