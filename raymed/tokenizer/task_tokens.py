"""A run's tokenizer with `model.add_tokens` in place, and the embedding rows of those tokens.

The data stage, the training workers and the checks before training all load the tokenizer
through `load_run_tokenizer`, so every stage sees the same ids. A pretrained model's
embedding grows to fit (`resize_token_embeddings`, which keeps a tied head tied) and each new
row starts as the mean of the rows of the tokenizer's own tokens, input and output alike:
a new token begins as an "average" token rather than noise. (transformers' mean resizing
samples around that mean instead; raymed sets it exactly, which needs no random draws.)
A scratch model is built with the tokens in its vocabulary, every row random alike.

Training the new rows in every scope:
    full        the whole embedding trains.
    top_layers  the input embedding (the head too, when tied) is made trainable, and a
                gradient hook zeroes every row but the new tokens': the rest of the bottom of
                the model stays bit-identical (its weight decay is 0, `optimizer_groups`).
    lora        peft's `trainable_token_indices`: a trainable delta for the new rows only
                (tied heads share it), merged into the weights at checkpoint time.
"""

from __future__ import annotations

import torch

from raymed.errors import RaymedError

ROW_MASKED = "_raymed_trained_rows"
"""Attribute on a parameter whose gradient is restricted to some rows (the new tokens')."""


def load_run_tokenizer(model_config):
    """The tokenizer `model_config` trains with (`model.tokenizer`, else the model's own),
    with `model.add_tokens` added in order."""
    from transformers import AutoTokenizer

    from raymed.assets import resolve_pretrained

    name = model_config.tokenizer or model_config.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(name))
    except (OSError, ValueError) as err:
        raise RaymedError(f"{name} is not a tokenizer transformers can load: {err}") from None
    add_task_tokens(tokenizer, model_config.add_tokens, name)
    return tokenizer


def add_task_tokens(tokenizer, tokens, tokenizer_name: str) -> list[int]:
    """Add `tokens` (TaskToken entries) to `tokenizer`; their new ids. A token the tokenizer
    already has is an error naming it (its id would not be new, nor its row)."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    for token in tokens:
        if token.content in vocab:
            raise RaymedError(f"model.add_tokens: {token.content!r} is already in the tokenizer {tokenizer_name} "
                              f"(id {vocab[token.content]}): remove it from model.add_tokens")
    tokenizer.add_tokens([AddedToken(t.content, special=t.special, normalized=False) for t in tokens])
    return task_token_ids(tokenizer, tokens)


def task_token_ids(tokenizer, tokens) -> list[int]:
    return tokenizer.convert_tokens_to_ids([t.content for t in tokens])


def fit_embeddings(model, tokenizer, new_ids: list[int]) -> None:
    """Give a pretrained model rows for the tokens just added (ids `new_ids`, after the
    tokenizer's own): grow the embedding when it is too small, then set those rows to the
    mean of the rows before them, in the input embedding and an untied output head."""
    if not new_ids:
        return
    first = min(new_ids)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for weight in _embedding_weights(model):
            weight[new_ids] = weight[:first].mean(dim=0)


def train_new_rows_only(model, new_ids: list[int]) -> None:
    """Make the input embedding (the head too, when tied) trainable for `new_ids`' rows only:
    a hook zeroes every other row's gradient, and the parameter is marked so that the
    optimizer gives it no weight decay (`optimizer_groups`). An untied head trains whole in
    top_layers already."""
    weight = model.get_input_embeddings().weight
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[new_ids] = 1
    weight.requires_grad = True
    weight.register_hook(lambda grad: grad * mask)
    setattr(weight, ROW_MASKED, new_ids)


def lora_token_indices(model, new_ids: list[int]) -> dict[str, list[int]]:
    """peft's `trainable_token_indices`: the input embedding's new rows, and an untied
    head's (a tied head shares the embedding's), by module name."""
    modules = [model.get_input_embeddings()]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not modules[0].weight:
        modules.append(head)
    names = {m: n for n, m in model.named_modules()}
    return {names[module].rsplit(".", 1)[-1]: list(new_ids) for module in modules}


def optimizer_groups(params: list, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: row-masked parameters without weight decay (decay would move
    the rows their gradient hook keeps still), the rest with it."""
    masked = [p for p in params if hasattr(p, ROW_MASKED)]
    rest = [p for p in params if not hasattr(p, ROW_MASKED)]
    groups = [{"params": rest, "weight_decay": weight_decay}]
    return groups + ([{"params": masked, "weight_decay": 0.0}] if masked else [])


def _embedding_weights(model) -> list[torch.nn.Parameter]:
    """The input embedding's weight, and the output head's when it is a different tensor."""
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    return weights
