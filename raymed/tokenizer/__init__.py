"""Tokenizers: trained on a corpus, and task tokens added to a model's tokenizer.

    config       `model.add_tokens` entries (TaskToken) and their checks (no I/O)
    train        byte-level BPE trained on a corpus read with Ray Data (`raymed tokenizer train`)
    task_tokens  loading a run's tokenizer with its added tokens; growing and training their rows
    cli          the `raymed tokenizer` subcommands

Nothing is imported here: raymed.config imports `raymed.tokenizer.config`, and the other
modules import raymed.config.
"""
