"""The running batch's keys and values in preallocated slots, and the decode step over them,
captured as CUDA graphs on a GPU.

Row i of every layer's `keys`/`values` tensor ([rows, heads, columns, head_dim]) belongs to
the i-th running sequence; `mask[i]` marks which of its columns hold tokens. All running
sequences write their next token at the same column, `end`, so one decode step is one
`index_copy_` per layer at a position held in a device tensor. Nothing about a step's
shapes depends on the sequences, which is what lets a step be captured once as a CUDA graph
(one per batch-size bucket) and replayed with a single launch: a decode step of a small
model is otherwise bound by launching hundreds of tiny kernels from Python.

A newcomer's prompt is prefilled elsewhere and copied in to end at `end`; when `end`
reaches the last column, the used columns move left (or the tensors grow).
"""

from __future__ import annotations

import inspect
import logging

import torch

logger = logging.getLogger("ray.serve")

FIRST_COLUMNS = 256


def cache_argument(model) -> str:
    """The name of the model's cache argument: transformers 5.24 renamed `past_key_values`
    to `cache` (the old name warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class SlotView:
    """What the model's attention layers get as their cache during a decode step: `update`
    writes the new key and value at the shared column and returns the rows and columns the
    step attends over. (Duck-typed: the model calls only `update`, because the step passes
    positions and a ready 4D mask.)"""

    is_compileable = True

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], column: torch.Tensor):
        self.keys, self.values, self.column = keys, values, column

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.column, key_states)
        values.index_copy_(2, self.column, value_states)
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never consulted: every step passes its position ids


class SlotCache:
    """Keys, values and mask of up to `rows` sequences; see the module docstring."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], rows: int, columns: int, max_columns: int):
        self.rows, self.columns, self.max_columns = rows, columns, max_columns
        self.keys = [k.new_zeros(rows, k.shape[1], columns, k.shape[3]) for k, _ in layers]
        self.values = [v.new_zeros(rows, v.shape[1], columns, v.shape[3]) for _, v in layers]
        self.mask = torch.zeros(rows, columns, dtype=torch.bool, device=layers[0][0].device)
        self.starts = [0] * rows  # each row's first column, kept on the host: no device sync per step
        self.end = 0
        self.column = torch.zeros(1, dtype=torch.long, device=self.mask.device)

    def first_used(self, used_rows: int) -> int:
        """The first column any of the first `used_rows` rows attends to (`end` if none)."""
        return min(self.starts[:used_rows], default=self.end)

    def make_room(self, used_rows: int, width: int) -> bool:
        """Arrange columns so that `width` columns end at `end` and `end` itself is free:
        move the used columns left when they leave more dead columns than live ones (or hit
        the last column), right when a newcomer's prompt is wider than `end`; grow if the
        live span does not fit. Returns whether the tensors were reallocated."""
        start = self.first_used(used_rows)
        span = self.end - start
        if self.end >= width and self.end < self.columns and start <= span:
            return False
        new_end = max(span, width)
        grown = new_end + 1 > self.columns
        if grown:
            if new_end + 1 > self.max_columns:
                raise ValueError(f"{new_end + 1} cache columns needed, more than the {self.max_columns} allowed")
            self._grow(min(self.max_columns, 1 << new_end.bit_length()))
        self._move_columns(used_rows, start, new_end)
        return grown

    def _grow(self, columns: int) -> None:
        for tensors in (self.keys, self.values):
            for i, old in enumerate(tensors):
                tensors[i] = old.new_zeros(*old.shape[:2], columns, old.shape[3])
                tensors[i][:, :, : self.columns] = old
        mask = self.mask.new_zeros(self.rows, columns)
        mask[:, : self.columns] = self.mask
        self.mask, self.columns = mask, columns

    def _move_columns(self, used_rows: int, start: int, new_end: int) -> None:
        """Move columns [start, end) of the used rows so they end at `new_end`."""
        span, new_start = self.end - start, new_end - (self.end - start)
        if span and new_start != start:
            for tensor in (*self.keys, *self.values):
                tensor[:used_rows, :, new_start:new_end] = tensor[:used_rows, :, start: self.end].clone()
            self.mask[:used_rows, new_start:new_end] = self.mask[:used_rows, start: self.end].clone()
        self.mask[:used_rows, :new_start] = False
        self.mask[:used_rows, new_end:] = False
        self.starts[:used_rows] = [s + new_start - start for s in self.starts[:used_rows]]
        self.end = new_end

    def place(self, first_row: int, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Copy newcomers' prefilled keys/values (left-padded to one width; `mask` [newcomers,
        width] on the host marks their tokens) into rows from `first_row` on, their last
        column just before `end`."""
        count, width = mask.shape
        rows, columns = slice(first_row, first_row + count), slice(self.end - width, self.end)
        for (keys, values), my_keys, my_values in zip(layers, self.keys, self.values, strict=True):
            my_keys[rows, :, columns] = keys
            my_values[rows, :, columns] = values
        self.mask[rows] = False
        self.mask[rows, columns] = mask.bool().to(self.mask.device)
        self.starts[rows] = [self.end - length for length in mask.sum(dim=1).tolist()]

    def move_rows(self, sources: list[int], targets: list[int]) -> None:
        """Copy rows `sources` onto rows `targets` (filling the holes finished sequences left)."""
        if not sources:
            return
        src = torch.tensor(sources, device=self.mask.device)
        dst = torch.tensor(targets, device=self.mask.device)
        for tensor in (*self.keys, *self.values, self.mask):
            tensor[dst] = tensor[src]
        for source, target in zip(sources, targets):
            self.starts[target] = self.starts[source]

    def view(self, rows: int, columns: int) -> tuple[SlotView, torch.Tensor]:
        """The cache and 4D attention mask a decode step over `rows` rows and the first
        `columns` columns uses."""
        keys = [k[:rows, :, :columns] for k in self.keys]
        values = [v[:rows, :, :columns] for v in self.values]
        return SlotView(keys, values, self.column), self.mask[:rows, None, None, :columns]


class DecodeStep:
    """One decode step over a SlotCache: `run(tokens, positions)` returns next-token
    logits. With `graphs`, each batch-size bucket's step is captured as a CUDA graph the
    first time it is needed (and again after the cache grows) and replayed after that."""

    def __init__(self, model, cache_arg: str, slots: SlotCache, graphs: bool):
        self.model, self.cache_arg, self.slots, self.graphs = model, cache_arg, slots, graphs
        device = slots.mask.device
        self.tokens = torch.zeros(slots.rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots.rows, 1, dtype=torch.long, device=device)
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    def forget_graphs(self) -> None:
        """Drop captured graphs (their tensors' addresses changed: the cache grew), and their
        memory pool with them: a pool no graph uses any more cannot take a new capture."""
        self._captured.clear()
        self._pool = None

    def run(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        count, slots = len(tokens), self.slots
        self.tokens[:count, 0] = torch.tensor(tokens)
        self.positions[:count, 0] = torch.tensor(positions)
        slots.column.fill_(slots.end)
        if not self.graphs:
            slots.mask[:count, slots.end] = True
            return self._forward(count, slots.end + 1)
        bucket = _bucket(count, slots.rows)
        slots.mask[:bucket, slots.end] = True  # idle rows attend to something: no NaN rows
        if bucket not in self._captured:
            try:
                self._captured[bucket] = self._capture(bucket)
            except Exception:  # a model whose step cannot be captured still serves, launched eagerly
                logger.warning("could not capture the decode step as a CUDA graph; launching it eagerly",
                               exc_info=True)
                self.graphs = False
                return self.run(tokens, positions)
        graph, logits = self._captured[bucket]
        graph.replay()
        return logits[:count]

    def _forward(self, rows: int, columns: int) -> torch.Tensor:
        cache, mask = self.slots.view(rows, columns)
        out = self.model(input_ids=self.tokens[:rows], position_ids=self.positions[:rows], attention_mask=mask,
                         use_cache=True, **{self.cache_arg: cache})
        return out.logits[:, -1, :]

    def _capture(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a side stream (as torch.cuda.graphs asks), then capture. The warm-up
        writes at column `end`, which the step about to run overwrites anyway."""
        columns = self.slots.columns
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(rows, columns)
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(rows, columns)
        logger.info("captured the decode step for %d rows x %d columns as a CUDA graph", rows, columns)
        return graph, logits


def _bucket(count: int, most: int) -> int:
    """The smallest power of two (or `most`) that holds `count` rows."""
    return min(most, 1 << (count - 1).bit_length())
