"""The model a run trains: built from pretrained weights or from an architecture, checked
against the tokenizer and block size, with only `train.scope`'s parameters trainable."""

from __future__ import annotations

import torch

from raymed.assets import resolve_pretrained
from raymed.config import Config, ModelConfig, TrainConfig
from raymed.errors import RaymedError
from raymed.tokenizer.task_tokens import (
    fit_embeddings,
    load_run_tokenizer,
    lora_token_indices,
    task_token_ids,
    train_new_rows_only,
)


def build_model(model_config: ModelConfig, tokenizer):
    """The causal LM to train: pretrained weights, or a fresh model of `architecture`."""
    from transformers import AutoModelForCausalLM

    attn = model_config.attn_implementation
    if model_config.init == "scratch":
        return AutoModelForCausalLM.from_config(scratch_config(model_config, tokenizer), attn_implementation=attn)
    path = resolve_pretrained(model_config.name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=torch.float32,
                                                     use_safetensors=True)
    except (OSError, ValueError) as err:
        raise RaymedError(f"{model_config.name} is not a causal LM that transformers can load: {err}") from None
    fit_embeddings(model, tokenizer, task_token_ids(tokenizer, model_config.add_tokens))
    return model


def load_tokenizer(model_config: ModelConfig):
    """The tokenizer the model trains with (its own unless `model.tokenizer` names another),
    with `model.add_tokens` added."""
    return load_run_tokenizer(model_config)


def scratch_config(model_config: ModelConfig, tokenizer):
    """The architecture's config, its vocabulary padded to a multiple of 64 (faster matmuls)
    and its special ids the tokenizer's (`architecture` may still set them)."""
    from transformers import AutoConfig

    arch = dict(model_config.architecture)
    vocab = -(-len(tokenizer) // 64) * 64
    return AutoConfig.for_model(arch.pop("model_type"), vocab_size=vocab, **special_token_ids(tokenizer) | arch)


def special_token_ids(tokenizer) -> dict[str, int]:
    """bos/eos ids of `tokenizer`, and pad's when it is a token of its own. (A pad shared with
    eos is left out: Llama-style models zero the pad row and never train it, which would
    leave the end of every answer unlearnable.)"""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        ids["pad_token_id"] = tokenizer.pad_token_id
    return {name: value for name, value in ids.items() if value is not None}


def check_model_fits(config: Config) -> None:
    """Fail before any worker starts: the tokenizer's ids must index the model's embedding,
    and a block must fit the model's context."""
    from transformers import AutoConfig

    tokenizer = load_tokenizer(config.model)
    if config.model.init == "scratch":
        model_config = scratch_config(config.model, tokenizer)
    else:
        try:
            model_config = AutoConfig.from_pretrained(resolve_pretrained(config.model.name))
        except (OSError, ValueError) as err:
            raise RaymedError(f"{config.model.name} is not a model transformers can load: {err}") from None
    text_config = model_config.get_text_config()
    own_tokens = len(tokenizer) - len(config.model.add_tokens)  # task tokens get rows of their own
    if own_tokens > text_config.vocab_size:
        raise RaymedError(
            f"the tokenizer has {own_tokens} tokens but the model's embedding has {text_config.vocab_size} rows: "
            "use the model's own tokenizer (model.tokenizer) or a model built for this one"
        )
    context = getattr(text_config, "max_position_embeddings", None) or getattr(text_config, "n_positions", None)
    if context and config.data.block_size > context:
        raise RaymedError(f"data.block_size {config.data.block_size} exceeds the model's context of {context} tokens")


def apply_scope(model, train: TrainConfig, new_token_ids: list[int] = ()):
    """The model with only what `train.scope` trains left trainable: everything (`full`),
    the last N blocks and an untied output head (`top_layers`), or LoRA adapters on every
    linear layer (`lora`, returned wrapped by peft). The rows of `new_token_ids` (task
    tokens) train in every scope (raymed.tokenizer.task_tokens says how)."""
    if train.scope == "lora":
        from peft import LoraConfig, get_peft_model

        new_rows = {"trainable_token_indices": lora_token_indices(model, new_token_ids)} if new_token_ids else {}
        lora = LoraConfig(r=train.lora_r, lora_alpha=train.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", task_type="CAUSAL_LM", **new_rows)
        return get_peft_model(model, lora)
    if train.scope == "top_layers":
        train_top_layers(model, train.top_layers)
        if new_token_ids:
            train_new_rows_only(model, new_token_ids)
    return model


def train_top_layers(model, top_layers: int) -> None:
    """Freeze all but the last `top_layers` decoder blocks and the output head. A head tied
    to the input embedding (SmolLM2's) is the bottom of the model too, so it stays frozen:
    everything below the top blocks stays bit-identical either way."""
    layers = decoder_layers(model)
    if top_layers > len(layers):
        raise RaymedError(f"train.top_layers is {top_layers} but the model has {len(layers)} layers")
    for param in model.parameters():
        param.requires_grad = False
    trainable = list(layers[-top_layers:])
    if not embeddings_tied(model):
        trainable.append(model.get_output_embeddings())
    for module in trainable:
        for param in module.parameters():
            param.requires_grad = True


def decoder_layers(model):
    """The model's stack of decoder blocks (Llama-style `layers`, GPT-2's `h`), inside a
    peft wrapper too."""
    inner = unwrap_peft(model).base_model
    return inner.layers if hasattr(inner, "layers") else inner.h


def unwrap_peft(model):
    """The Hugging Face model inside a peft wrapper (the model itself otherwise)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (before DDP or FSDP wraps the
    model); non-reentrant, so frozen inputs (top_layers, lora) still get gradients."""
    unwrap_peft(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def embeddings_tied(model) -> bool:
    """Whether the output head's weight is the input embedding's (one tensor)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def flops_per_token(model, block_size: int) -> float:
    """Training FLOPs per token by the nanoGPT/PaLM formula: 6N + 12·L·H·Q·T."""
    config = model.config.get_text_config()
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = config.hidden_size // heads
    params = sum(p.numel() for p in model.parameters())
    return 6 * params + 12 * layers * heads * head_dim * block_size


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if hasattr(model, "module") else model
