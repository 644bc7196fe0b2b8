"""Helpers for the Serve tests: a tiny model on disk, a signal actor, starting an app."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import ray
import requests

TINY_ARCHITECTURE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=2048)


def save_tiny_model(out: Path, tokenizer_dir: Path, seed: int = 0,
                    context: int = TINY_ARCHITECTURE["max_position_embeddings"]) -> Path:
    """A 2-layer random Llama with the default model's tokenizer and chat template, saved
    as a Hugging Face directory (what a served model is), taking `context` tokens. Same
    seed, same weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=-(-len(tokenizer) // 64) * 64, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id,
                         **TINY_ARCHITECTURE | {"max_position_embeddings": context})
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@ray.remote(num_cpus=0)
class Gate:
    """A signal actor: `wait()` blocks until `release()`; counts who is waiting."""

    def __init__(self):
        import asyncio

        self._open = asyncio.Event()
        self._waiting = 0

    async def wait(self) -> None:
        self._waiting += 1
        try:
            await self._open.wait()
        finally:
            self._waiting -= 1

    def release(self) -> None:
        self._open.set()

    def close(self) -> None:
        """Hold requests that arrive from now on (those already let through go on)."""
        self._open.clear()

    def waiting(self) -> int:
        return self._waiting


def tiny_engine_model(default_assets: Path):
    """A tiny Llama (seed 0, random weights) with the default tokenizer: (model, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(default_assets / "models" / "smollm2-135m-instruct")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, **TINY_ARCHITECTURE)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(application, port: int) -> str:
    """Run a Serve application on `port` and return its base URL once /health answers."""
    from ray import serve

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(application, name="raymed", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: requests.get(f"{url}/health", timeout=5).status_code == 200, timeout=60)
    return url


def wait_for(condition, timeout: float = 30, interval: float = 0.05):
    """Poll `condition` until it is truthy (errors count as not yet); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as err:  # e.g. the proxy not listening yet
            last_error = err
        time.sleep(interval)
    raise TimeoutError(f"condition not met within {timeout} s (last error: {last_error})")


def sse_events(response) -> list:
    """The JSON payloads of an SSE response, up to and excluding `[DONE]`."""
    import json

    events = []
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return events
        events.append(json.loads(data))
    raise AssertionError(f"the stream ended without [DONE] after {len(events)} events")


def metric(url, name, **labels) -> float:
    """Sum of a Prometheus metric over the series that carry `labels`."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    total = 0.0
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(w in series for w in wanted):
            total += float(value)
    return total
