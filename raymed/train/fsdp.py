"""`train.strategy: fsdp`: PyTorch FSDP2 (`fully_shard`) inside a Ray Train worker, and its
checkpoints.

Sharding: one FSDP unit per decoder layer, then the root (embeddings, final norm and
output head, so a tied input/output embedding stays in one unit), over a 1-D device mesh
of all workers. On a GPU with `train.bf16` the parameters are gathered in bf16 and
gradients reduced in fp32; on CPU everything is fp32 over gloo.

Checkpoints: every rank saves its shards of the model and the optimizer with
torch.distributed.checkpoint (DCP) into `sharded/`, and rank 0 writes, beside them, the
consolidated Hugging Face directory (gathered to its CPU), the scheduler and the trainer
state. DCP loads the shards on any number of workers (it reshards); `from_pretrained`,
`raymed eval`, the registry and Serve read the Hugging Face files as they read DDP ones.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raymed.config import TrainConfig
from raymed.errors import RaymedError
from raymed.train.checkpoint import check_files, save_checkpoint_model
from raymed.train.model import apply_scope, decoder_layers, unwrap_peft

SHARDED_DIR = "sharded"
"""The DCP directory inside a checkpoint: `.metadata` and one `__<rank>_0.distcp` per rank."""


def shard_model(model, train: TrainConfig, device: torch.device, world: int):
    """`model` sharded in place over `world` workers (its parameters become DTensors)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    check_uniform_dtype(model)
    options = {"mesh": init_device_mesh(device.type, (world,)),
               "reshard_after_forward": train.reshard_after_forward}
    if train.bf16:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if train.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in decoder_layers(model):
        if train.compile:
            layer.compile()
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def check_uniform_dtype(model) -> None:
    """FSDP2 flattens a unit's parameters into one all-gather buffer: they must share a dtype
    (peft's adapters on a half-precision base would not)."""
    dtypes: dict[torch.dtype, str] = {}
    for name, param in model.named_parameters():
        dtypes.setdefault(param.dtype, name)
    if len(dtypes) > 1:
        found = ", ".join(f"{dtype} ({name})" for dtype, name in dtypes.items())
        raise RaymedError(f"train.strategy fsdp needs one parameter dtype, the model has several: {found}")


def local_state_bytes(params, optimizer) -> dict[str, int]:
    """Bytes this rank holds of the parameters, their gradients and the optimizer state: the
    local shards under FSDP (a DTensor's `to_local()`), whole tensors under DDP."""
    def local(tensor) -> torch.Tensor:
        return tensor.to_local() if hasattr(tensor, "to_local") else tensor

    def size(tensors) -> int:
        return sum(local(t).numel() * local(t).element_size() for t in tensors if t is not None)

    params = list(params)
    optimizer_tensors = [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return {"params": size(params), "grads": size(p.grad for p in params), "optimizer": size(optimizer_tensors)}


def save_sharded_state(directory: Path, model, optimizer) -> None:
    """This rank's shards of the model and optimizer into `directory` (DCP; a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)


def load_sharded_state(model, optimizer, checkpoint: Path) -> None:
    """A checkpoint's sharded model and optimizer state into `model` and `optimizer`,
    resharded to however many ranks run now (one, without torch.distributed, works too).
    A shard file that differs from the completion mark is an error naming it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    check_files(checkpoint, SHARDED_DIR)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=checkpoint / SHARDED_DIR)
    except Exception as err:  # DCP wraps every rank's failure in its own exception type
        why = str(err).strip().splitlines()[-1]
        raise RaymedError(f"sharded checkpoint {checkpoint / SHARDED_DIR} does not load into the model being "
                          f"trained ({why}): resume with the model that wrote it") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def gather_full_state(model) -> dict[str, torch.Tensor]:
    """The whole model's state on rank 0's CPU (an empty dict on the other ranks; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_consolidated(out: Path, model, full_state: dict, tokenizer, train: TrainConfig) -> None:
    """The Hugging Face directory of a sharded model, from its gathered state: written from a
    plain copy of the architecture, exactly as a DDP checkpoint is (merged LoRA weights and
    `adapter/` included)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every tensor is overwritten by the gathered state
        plain = AutoModelForCausalLM.from_config(unwrap_peft(model).config)
    plain = apply_scope(plain, train)
    plain.load_state_dict(full_state, strict=True)
    save_checkpoint_model(plain, tokenizer, out)
