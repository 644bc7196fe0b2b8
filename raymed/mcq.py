"""Multiple-choice scoring: each option is scored by the model's log-likelihood of the
option's text as the answer to the question; the highest score is the model's answer.

Length normalisation divides by the option's length in characters (the `acc_norm`
convention of lm-evaluation-harness), so long options are not penalised for having more
tokens; unnormalised scores are the plain sums.
"""

from __future__ import annotations

import torch


def option_logprobs(model, tokenizer, question: str, options: list[str]) -> list[float]:
    """Summed log-likelihood of each option's tokens as the assistant's answer to `question`,
    all options scored in one padded forward pass."""
    prompt_ids = _prompt_ids(tokenizer, question)
    option_ids = [tokenizer(o.strip(), add_special_tokens=False).input_ids for o in options]
    rows = [prompt_ids + ids for ids in option_ids]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)).logits.float().cpu()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
    start = len(prompt_ids) - 1  # the logit at position t predicts token t + 1
    return [
        logprobs[row, start : start + len(ids)].gather(1, torch.tensor(ids)[:, None]).sum().item()
        for row, ids in enumerate(option_ids)
    ]


def pick(options: list[str], logprobs: list[float], *, length_norm: bool = True) -> int:
    """The index of the best option, by log-likelihood per character or in total."""
    scores = [lp / len(o.strip()) if length_norm else lp for o, lp in zip(options, logprobs)]
    return max(range(len(scores)), key=scores.__getitem__)


def _prompt_ids(tokenizer, question: str) -> list[int]:
    """The question as the model expects a user turn: its chat template when it has one."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(f"Question: {question}\nAnswer: ").input_ids
