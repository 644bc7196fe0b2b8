"""Multiple-choice scoring: each option is scored by the model's log-likelihood of the
option's text as the answer to the question; the highest score is the model's answer.

Length normalisation divides by the option's length in characters (the `acc_norm`
convention of lm-evaluation-harness), so long options are not penalised for having more
tokens; unnormalised scores are the plain sums.
"""

from __future__ import annotations

import torch


def option_logprobs(model, tokenizer, question: str, options: list[str], system: str = "") -> list[float]:
    """Summed log-likelihood of each option's tokens as the assistant's answer to `question`
    (after the system message `system`, if any). The prompt runs once and its key/value
    cache is repeated for every option, so the options' forward pass covers only their own
    tokens (on the default items the prompt is about 47 tokens and an option about 9)."""
    from raymed.serve.slots import cache_argument

    prompt_ids = _prompt_ids(tokenizer, question, system)
    option_ids = [tokenizer(o.strip(), add_special_tokens=False).input_ids for o in options]
    with torch.no_grad():
        prompt = model(input_ids=torch.tensor([prompt_ids], device=model.device), use_cache=True)
        cache = prompt.past_key_values
        cache.batch_repeat_interleave(len(option_ids))
        width = max(len(ids) for ids in option_ids)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in option_ids], device=model.device)
        attention = torch.tensor([[1] * (len(prompt_ids) + len(ids)) + [0] * (width - len(ids)) for ids in option_ids],
                                 device=model.device)
        logits = model(input_ids=input_ids, attention_mask=attention, **{cache_argument(model): cache}).logits
    first = torch.log_softmax(prompt.logits[0, -1].float().cpu(), dim=-1)  # predicts each option's first token
    rest = torch.log_softmax(logits[:, :-1].float().cpu(), dim=-1)
    return [first[ids[0]].item() + rest[row, : len(ids) - 1].gather(1, torch.tensor(ids[1:])[:, None]).sum().item()
            for row, ids in enumerate(option_ids)]


def pick(options: list[str], logprobs: list[float], *, length_norm: bool = True) -> int:
    """The index of the best option, by log-likelihood per character or in total."""
    scores = [lp / len(o.strip()) if length_norm else lp for o, lp in zip(options, logprobs)]
    return max(range(len(scores)), key=scores.__getitem__)


def _prompt_ids(tokenizer, question: str, system: str = "") -> list[int]:
    """The question as the model expects a user turn: its chat template when it has one."""
    if tokenizer.chat_template:
        turns = [{"role": "system", "content": system}] if system else []
        text = tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(f"{system}\n\n" * bool(system) + f"Question: {question}\nAnswer: ").input_ids
