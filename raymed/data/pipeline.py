"""Ray Data: corpus files → validated records → tokens with loss masks → packed blocks.

    read (jsonl/json/txt as bytes, parquet/csv natively) → one `record` JSON string per row,
      or an `error` reason (malformed_json, non_utf8, ...)
    tokenize on an actor pool (tokenizer loaded once per actor): chat template, labels
      -100 outside answers, a seeded `order` key and a train/validation `split`
    count bad rows by reason (read = kept + bad), stop if on_bad_row is fail
    sort by `order` (a seeded shuffle that does not depend on how files were read)
    pack into blocks of block_size → datasets "train" and "validation"
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.data.expressions import col

from raymed.assets import resolve_corpus, resolve_pretrained
from raymed.config import Config, ModelConfig
from raymed.data.pack import pack
from raymed.data.records import BadRecord, detect_shape, render, to_messages, tokenize
from raymed.errors import RaymedError

FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
BLOCK_FIELDS = ("input_ids", "labels", "position_ids")
SHAPE_SAMPLE = 200
PACK_GROUP = 4096
"""About how many examples are packed together in one sorted partition."""
ORDER_RANGE = 2**63


@dataclass
class DataStats:
    """What the data stage did, by split; `bad` counts rows left out, by reason."""

    shape: str
    rows_read: int = 0
    kept: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    blocks: dict[str, int] = field(default_factory=dict)
    block_size: int = 0
    example_lengths: list[int] = field(default_factory=list)

    @property
    def packing_efficiency(self) -> float:
        total = sum(self.blocks.values()) * self.block_size
        return sum(self.tokens.values()) / total if total else 0.0


def build_datasets(config: Config) -> tuple[dict[str, ray.data.Dataset], DataStats]:
    """The packed `train` and `validation` datasets for `config`, and their stats."""
    data = config.data
    train_path, validation_path = resolve_corpus(data.train_path, data.validation_path)
    raw = read_records(train_path)
    if validation_path:
        raw = raw.union(_validation_records(validation_path, data.max_validation_records))
    elif data.max_validation_records:
        raise RaymedError(f"data.max_validation_records needs a validation file: {train_path} has none "
                          "(set data.validation_path)")
    shape = data.shape if data.shape != "auto" else detect_corpus_shape(raw)
    # Resolved here, once: the actors get a path, and a bad tokenizer or task token fails here.
    model_config = {**config.model.model_dump(),
                    "tokenizer": resolve_pretrained(config.model.tokenizer or config.model.name)}
    pad_id = _pad_id(model_config)
    examples = raw.map_batches(
        Tokenize,
        fn_constructor_kwargs={
            "model_config": model_config, "shape": shape, "block_size": data.block_size,
            "seed": config.seed, "val_fraction": 0.0 if validation_path else data.val_fraction,
        },
        batch_format="pyarrow",
        batch_size=256,
        compute=ray.data.ActorPoolStrategy(size=data.tokenizer_actors),
    ).materialize()
    stats = _count(examples, shape, data.block_size)
    if stats.bad and data.on_bad_row == "fail":
        raise RaymedError(
            f"{sum(stats.bad.values())} bad rows in {train_path} ({_reasons(stats.bad)}) and "
            "data.on_bad_row is fail: fix the rows or set data.on_bad_row=skip"
        )
    datasets = {}
    for split in ("train", "validation"):
        kept = examples.filter(expr=(col("error") == "") & (col("split") == split))
        with _ordered_execution():
            blocks = _sorted_in_fixed_groups(kept).map_batches(
                _pack_batch, fn_kwargs={"block_size": data.block_size, "pad_id": pad_id},
                batch_format="pyarrow", batch_size=None,
            ).materialize()
        datasets[split] = blocks
        stats.blocks[split] = blocks.count()
        stats.tokens[split] = int(blocks.sum("real_tokens") or 0)
    if stats.blocks["train"] == 0:
        raise RaymedError(f"no training examples left in {train_path} ({_reasons(stats.bad) or 'empty'})")
    return datasets, stats


def _validation_records(path: str, limit: int | None) -> ray.data.Dataset:
    """The validation file's rows; with `limit`, only its first `limit` (one file: a fixed set)."""
    records = read_records(path, split="validation")
    return records.limit(limit) if limit else records


def _sorted_in_fixed_groups(examples: ray.data.Dataset) -> ray.data.Dataset:
    """Examples in seeded order, partitioned at fixed `order` boundaries, so every run packs
    the same examples together whatever Ray's sampling or scheduling does."""
    groups = max(1, examples.count() // PACK_GROUP)
    step = ORDER_RANGE // groups
    return examples.sort("order", boundaries=[i * step for i in range(1, groups)])


@contextmanager
def _ordered_execution():
    """Keep block order through the packing step (Ray Data reorders by completion otherwise)."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = before


def read_records(path: str, split: str | None = None) -> ray.data.Dataset:
    """Rows of `record` (a JSON object as a string) and `error` ('' when the row is fine)."""
    fmt = _format_of(path)
    if fmt in ("parquet", "csv"):
        reader = ray.data.read_parquet if fmt == "parquet" else ray.data.read_csv
        ds = reader(path).map_batches(_table_to_records, batch_format="pandas")
    else:
        ds = ray.data.read_binary_files(path, file_extensions=[fmt if fmt != "text" else "txt"])
        ds = ds.flat_map(_split_file, fn_kwargs={"fmt": fmt})
    if split:
        ds = ds.map(lambda row: {**row, "forced_split": split})
    return ds


def _format_of(path: str) -> str:
    suffixes = {Path(path).suffix.lower()} if Path(path).suffix else _suffixes_in(path)
    formats = {FORMATS[s] for s in suffixes if s in FORMATS}
    if len(formats) != 1:
        raise RaymedError(
            f"cannot tell the format of {path} (found {', '.join(sorted(suffixes)) or 'no files'}): "
            f"use one of {', '.join(FORMATS)}"
        )
    return formats.pop()


def _suffixes_in(path: str) -> set[str]:
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(path)
    except (pa.ArrowInvalid, ValueError):
        fs, root = pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return {Path(i.path).suffix.lower() for i in infos if i.type == pafs.FileType.File}


def _split_file(row: dict, fmt: str) -> list[dict]:
    """One file's bytes → one row per record, each fine or carrying its error reason."""
    content: bytes = row["bytes"]
    if fmt == "jsonl":
        return [_parse_json(line) for line in content.splitlines() if line.strip()]
    if fmt == "json":
        parsed = _parse_json(content)
        if parsed["error"]:
            return [parsed]
        records = json.loads(parsed["record"])
        return [_ok(r) for r in (records if isinstance(records, list) else [records])]
    return [_parse_text(p) for p in content.split(b"\n\n") if p.strip()]


def _parse_json(raw: bytes) -> dict:
    try:
        return _ok(json.loads(raw.decode("utf-8")))
    except UnicodeDecodeError:
        return _bad("non_utf8")
    except json.JSONDecodeError:
        return _bad("malformed_json")


def _parse_text(raw: bytes) -> dict:
    try:
        return _ok({"text": raw.decode("utf-8").strip()})
    except UnicodeDecodeError:
        return _bad("non_utf8")


def _ok(record) -> dict:
    return {"record": json.dumps(record, ensure_ascii=False), "error": ""}


def _bad(reason: str) -> dict:
    return {"record": "", "error": reason}


def _table_to_records(frame):
    import pandas as pd

    return pd.DataFrame({
        "record": [json.dumps(r, ensure_ascii=False, default=str) for r in frame.to_dict("records")],
        "error": [""] * len(frame),
    })


def detect_corpus_shape(raw: ray.data.Dataset) -> str:
    """The shape most of the first records read have (`read_records` rows)."""
    sample = [json.loads(r["record"]) for r in raw.filter(expr=col("error") == "").take(SHAPE_SAMPLE)]
    try:
        return detect_shape(r for r in sample if isinstance(r, dict))
    except BadRecord as err:
        raise RaymedError(f"{err}: set data.shape to force one") from None


class Tokenize:
    """Ray Data actor: loads the tokenizer once, turns records into masked token ids."""

    def __init__(self, model_config: dict, shape: str, block_size: int, seed: int, val_fraction: float):
        self.tokenizer = _run_tokenizer(model_config)
        self.shape, self.block_size = shape, block_size
        self.seed, self.val_fraction = seed, val_fraction

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self._example(row) for row in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=EXAMPLE_SCHEMA)

    def _example(self, row: dict) -> dict:
        out = {"input_ids": [], "labels": [], "error": row["error"], "order": 0,
               "split": row.get("forced_split") or "train"}
        if out["error"]:
            return out
        try:
            messages = to_messages(json.loads(row["record"]), self.shape)
            ids, labels = tokenize(self.tokenizer, *render(self.tokenizer, messages))
        except BadRecord as err:
            return {**out, "error": err.reason}
        if len(ids) > self.block_size:
            return {**out, "error": "longer_than_block"}
        if all(label < 0 for label in labels[1:]):  # packing unlabels the first token
            return {**out, "error": "nothing_to_train"}
        digest = hashlib.blake2b(f"{self.seed}\0{row['record']}".encode(), digest_size=16).digest()
        if row.get("forced_split") is None and int.from_bytes(digest[8:], "big") / 2**64 < self.val_fraction:
            out["split"] = "validation"
        return {**out, "input_ids": ids, "labels": labels, "order": int.from_bytes(digest[:8], "big") % ORDER_RANGE}


EXAMPLE_SCHEMA = pa.schema([
    ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
    ("error", pa.string()), ("order", pa.int64()), ("split", pa.string()),
])


def _pack_batch(batch: pa.Table, block_size: int, pad_id: int) -> dict[str, np.ndarray]:
    examples = zip(batch.column("input_ids").to_pylist(), batch.column("labels").to_pylist())
    blocks = list(pack(examples, block_size, pad_id))
    return {
        **{name: np.array([b[name] for b in blocks], dtype=np.int64).reshape(-1, block_size) for name in BLOCK_FIELDS},
        "real_tokens": np.array([b["real_tokens"] for b in blocks], dtype=np.int64),
    }


def _count(examples: ray.data.Dataset, shape: str, block_size: int) -> DataStats:
    errors = Counter()
    lengths = []
    for batch in examples.select_columns(["error", "input_ids"]).iter_batches(batch_format="pyarrow", batch_size=4096):
        errors.update(batch.column("error").to_pylist())
        lengths += [len(ids) for ids in batch.column("input_ids").to_pylist() if ids]
    kept = errors.pop("", 0)
    return DataStats(shape=shape, rows_read=kept + sum(errors.values()), kept=kept,
                     bad=dict(sorted(errors.items())), block_size=block_size, example_lengths=lengths)


def _reasons(bad: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in bad.items())


def _run_tokenizer(model_config: dict):
    """The model's tokenizer with its task tokens (`model.add_tokens`), as training loads it."""
    from raymed.tokenizer.task_tokens import load_run_tokenizer

    return load_run_tokenizer(ModelConfig.model_validate(model_config))


def _pad_id(model_config: dict) -> int:
    tokenizer = _run_tokenizer(model_config)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
