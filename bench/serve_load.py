"""Load on the Serve endpoint: requests/s, generated tokens/s, TTFT and end-to-end latency
at each concurrency level, against plain one-request-at-a-time `generate` on the same
prompts, in the same run. Prints JSON.

    raymed serve --set serve.num_cpus=2 &           # or serve run serve/config.yaml
    python bench/serve_load.py --concurrency 1 4 16 --requests 32 --max-tokens 32 \\
        --baseline-model smollm2-135m-instruct

Chat requests (streamed, greedy unless --temperature) use the user turns of the default
corpus's validation split. `--temperature/--top-p/--logprobs/--penalties` set the sampling
fields; `--compare-sampling` runs every level three ways in the same run (greedy; sampled at
temperature 0.7, top_p 0.9, frequency penalty 0.5; greedy with logprobs, top 5) and reports
each one's tokens/s against greedy; `--sampled-share F` instead makes that share of every
level's requests sampled (the "sampled" variant's fields, spread evenly), the rest as given,
so greedy and sampled rows share the replica's batches. `--compare-grounding` runs every
level with grounding off and on (the `"grounding"` request extension; the server must have
grounding on) and reports the grounded level's end-to-end and first-token latency p50 over
the ungrounded one's.
`--burst N` times instead a short prompt's first token when it arrives `--burst-delay` s
after N long prompts (`--prompt-chars`), against the same prompt's first token on the idle
server (its own prefill), `--burst-rounds` times. Works the same against a GPU deployment
(the baseline then runs on the GPU too).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import aiohttp


def main() -> None:
    args = _parser().parse_args()
    if args.burst:
        report = asyncio.run(short_behind_burst(args))
        print(json.dumps(report, indent=2))
        return
    if not 0 <= args.sampled_share <= 1:
        raise SystemExit(f"--sampled-share must be between 0 and 1, not {args.sampled_share}")
    most = max(args.concurrency) * args.rounds if args.rounds else args.requests
    prompts = load_prompts(max(most, args.baseline_requests or 0), *args.prompt_chars)
    model = args.model or asyncio.run(served_model_name(args.url, args.api_key))
    report = {"url": args.url, "model": model, "max_tokens": args.max_tokens, "stream": args.stream,
              "sampled_share": args.sampled_share,
              "prompt_chars": args.prompt_chars,
              "requests_per_level": f"{args.rounds} x concurrency" if args.rounds else args.requests,
              "machine": machine(), "levels": []}
    variants = SAMPLING_VARIANTS if args.compare_sampling else GROUNDING_VARIANTS if args.compare_grounding \
        else {"as given": {}}
    for concurrency in args.concurrency:
        count = concurrency * args.rounds if args.rounds else args.requests
        for name, overrides in variants.items():
            result = asyncio.run(run_level(argparse.Namespace(**{**vars(args), **overrides}), model,
                                           prompts[:count], concurrency))
            report["levels"].append({"variant": name, "sampling": sampling_fields(
                argparse.Namespace(**{**vars(args), **overrides})), **result})
            print(json.dumps(report["levels"][-1]), flush=True)
    if args.compare_sampling:
        report["vs_greedy"] = vs_greedy(report["levels"])
    if args.compare_grounding:
        report["grounded_vs_ungrounded"] = grounded_vs_ungrounded(report["levels"])
    if args.baseline_model:
        report["baselines"], report["speedup_vs_baseline"] = [], {}
        for dtype in args.baseline_dtype:
            report["baselines"].append(baseline(args.baseline_model, prompts[: args.baseline_requests],
                                                args.max_tokens, args.baseline_threads, args.baseline_batch, dtype))
            print(json.dumps({"baseline": report["baselines"][-1]}), flush=True)
            base = report["baselines"][-1]["generated_tokens_per_s"]
            report["speedup_vs_baseline"][report["baselines"][-1]["dtype"]] = {
                f"{level['variant']} @ {level['concurrency']}": round(level["generated_tokens_per_s"] / base, 2)
                for level in report["levels"]}
    report["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(report, indent=2))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="the served model's name (default: the first of /v1/models)")
    parser.add_argument("--api-key", default=os.environ.get("RAYMED_API_KEY"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--rounds", type=int, help="instead of --requests: concurrency × ROUNDS requests per level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0, help="default 0 (greedy)")
    parser.add_argument("--top-p", type=float, help="default: not sent (the model's default)")
    parser.add_argument("--logprobs", type=int, metavar="TOP", help="ask for logprobs with TOP alternatives")
    parser.add_argument("--penalties", type=float, metavar="F", help="frequency_penalty F")
    parser.add_argument("--compare-sampling", action="store_true",
                        help="run each level greedy, sampled and with logprobs (see the module docstring)")
    parser.add_argument("--sampled-share", type=float, default=0.0, metavar="F",
                        help="share of each level's requests sent with the sampled variant's fields (0 to 1)")
    parser.add_argument("--grounding", choices=["true", "false"],
                        help="send the grounding extension field (default: not sent, the server's default)")
    parser.add_argument("--compare-grounding", action="store_true",
                        help="run each level with grounding off and on (see the module docstring)")
    parser.add_argument("--prompt-chars", type=int, nargs=2, default=(0, None), metavar=("MIN", "MAX"),
                        help="prompt length range in characters (about 4 per token)")
    parser.add_argument("--burst", type=int, metavar="N", help="time a short prompt behind N long ones "
                        "(see the module docstring)")
    parser.add_argument("--burst-delay", type=float, default=0.5, help="seconds between the burst and the short prompt")
    parser.add_argument("--burst-rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2, help="requests sent before each level, not counted")
    parser.add_argument("--baseline-model", help="also time plain `generate`, one request at a time, on this "
                        "model (a cached name or directory): the baseline the ratio is against")
    parser.add_argument("--baseline-requests", type=int, help="how many of the prompts the baseline runs "
                        "(default: all; plain generate at batch 1 is slow)")
    parser.add_argument("--baseline-batch", type=int, default=1, help="prompts per `generate` call in the "
                        "baseline, left-padded (default 1: one request at a time)")
    parser.add_argument("--no-stream", dest="stream", action="store_false",
                        help="non-streaming requests (TTFT is then the whole latency)")
    parser.add_argument("--baseline-dtype", nargs="+", default=["auto"],
                        choices=["auto", "float32", "bfloat16"], help="the baseline's dtype(s), each timed in "
                        "turn (default auto: serve.dtype's rule, so like for like with a default server)")
    parser.add_argument("--baseline-threads", type=int, help="torch threads for the baseline (match the "
                        "replica's serve.num_cpus for a like-for-like ratio; default: torch's)")
    return parser


def load_prompts(count: int, min_chars: int = 0, max_chars: int | None = None) -> list[str]:
    """User turns from the default corpus's validation split (as many as `count`, cycled);
    consecutive turns are joined until a prompt has `min_chars`, and cut at `max_chars`."""
    from raymed.assets import asset_path

    path = asset_path("corpus/medical-v1") / "validation.jsonl"
    with path.open() as lines:
        turns = [m["content"] for line in lines for m in json.loads(line)["messages"] if m["role"] == "user"]
    prompts, at = [], 0
    while len(prompts) < count:
        prompt = turns[at % len(turns)]
        at += 1
        while len(prompt) < min_chars:
            prompt += " " + turns[at % len(turns)]
            at += 1
        prompts.append(prompt[:max_chars])
    return prompts


async def served_model_name(url: str, api_key: str | None) -> str:
    async with aiohttp.ClientSession(headers=_headers(api_key)) as session:
        async with session.get(f"{url}/v1/models") as response:
            return (await response.json())["data"][0]["id"]


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def run_level(args, model: str, prompts: list[str], concurrency: int) -> dict:
    """Send every prompt with at most `concurrency` in flight; measure each request."""
    limit = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(headers=_headers(args.api_key), timeout=timeout) as session:
        await asyncio.gather(*(one_request(session, args, model, p) for p in prompts[: args.warmup]))

        sampled = argparse.Namespace(**{**vars(args), **SAMPLING_VARIANTS["sampled"]})

        async def limited(i, prompt):
            async with limit:
                return await one_request(session, sampled if is_sampled(i, args.sampled_share) else args, model,
                                         prompt)

        started = time.perf_counter()
        results = await asyncio.gather(*(limited(i, p) for i, p in enumerate(prompts)))
        wall = time.perf_counter() - started
    ok = [r for r in results if r["error"] is None]
    tokens = sum(r["completion_tokens"] for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if r["error"] is not None:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    return {
        "concurrency": concurrency, "requests": len(results), "ok": len(ok), "errors": errors,
        "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 3),
        "generated_tokens": tokens, "generated_tokens_per_s": round(tokens / wall, 2),
        "ttft_s": percentiles([r["ttft_s"] for r in ok]), "e2e_s": percentiles([r["e2e_s"] for r in ok]),
    }


async def short_behind_burst(args) -> dict:
    """The short prompt's TTFT alone and behind each burst of `args.burst` long prompts."""
    model = args.model or await served_model_name(args.url, args.api_key)
    short = load_prompts(1)[0]
    longs = load_prompts(args.burst, *args.prompt_chars)
    first_token = argparse.Namespace(**{**vars(args), "stream": True, "max_tokens": 1})
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(headers=_headers(args.api_key), timeout=timeout) as session:
        for prompt in (short, *longs[:1]):  # warm-up, not counted
            await one_request(session, first_token, model, prompt)
        alone, behind, long_ttft = [], [], []
        for _ in range(args.burst_rounds):
            alone.append(_ttft(await one_request(session, first_token, model, short)))
            burst = [asyncio.create_task(one_request(session, args, model, p)) for p in longs]
            await asyncio.sleep(args.burst_delay)
            behind.append(_ttft(await one_request(session, first_token, model, short)))
            long_ttft += [_ttft(result) for result in await asyncio.gather(*burst)]
    ratios = [round(b / a, 2) for a, b in zip(alone, behind)]
    return {"url": args.url, "model": model, "machine": machine(), "long_prompts": args.burst,
            "long_prompt_chars": args.prompt_chars, "short_prompt_chars": len(short),
            "burst_delay_s": args.burst_delay, "short_ttft_alone_s": alone, "short_ttft_behind_burst_s": behind,
            "ratio": ratios, "ratio_median": statistics.median(ratios),
            "long_ttft_s": percentiles(long_ttft), "load_avg_at_end": [round(x, 2) for x in os.getloadavg()]}


def _ttft(result: dict) -> float:
    if result["error"] is not None:
        raise SystemExit(f"a request failed: {result['error']}")
    return result["ttft_s"]


SAMPLING_VARIANTS = {
    "greedy": {"temperature": 0, "top_p": None, "logprobs": None, "penalties": None},
    "sampled": {"temperature": 0.7, "top_p": 0.9, "logprobs": None, "penalties": 0.5},
    "logprobs": {"temperature": 0, "top_p": None, "logprobs": 5, "penalties": None},
}
GROUNDING_VARIANTS = {"ungrounded": {"grounding": "false"}, "grounded": {"grounding": "true"}}


def is_sampled(index: int, share: float) -> bool:
    """Whether request `index` of a level is a sampled one: `share` of them, evenly spread."""
    return int((index + 1) * share) > int(index * share)


def sampling_fields(args) -> dict:
    """The request's sampling fields from the flags (unset ones are not sent)."""
    fields = {"temperature": args.temperature}
    if args.top_p is not None:
        fields["top_p"] = args.top_p
    if args.logprobs is not None:
        fields |= {"logprobs": True, "top_logprobs": args.logprobs}
    if args.penalties is not None:
        fields["frequency_penalty"] = args.penalties
    if args.grounding is not None:
        fields["grounding"] = args.grounding == "true"
    return fields


def vs_greedy(levels: list[dict]) -> dict[str, list[float]]:
    """Each variant's generated tokens/s over the greedy level run just before it at the same
    concurrency (one ratio per repeat of that concurrency)."""
    ratios: dict[str, list[float]] = {}
    greedy: dict[int, float] = {}
    for level in levels:
        if level["variant"] == "greedy":
            greedy[level["concurrency"]] = level["generated_tokens_per_s"]
        elif greedy.get(level["concurrency"]):
            ratios.setdefault(f"{level['variant']} @ {level['concurrency']}", []).append(
                round(level["generated_tokens_per_s"] / greedy[level["concurrency"]], 3))
    return ratios


def grounded_vs_ungrounded(levels: list[dict]) -> dict[str, dict[str, float]]:
    """At each concurrency, the grounded level's latency p50s over the ungrounded level's just before it."""
    ratios: dict[str, dict[str, float]] = {}
    ungrounded: dict[int, dict] = {}
    for level in levels:
        if level["variant"] == "ungrounded":
            ungrounded[level["concurrency"]] = level
        elif level["concurrency"] in ungrounded:
            base = ungrounded[level["concurrency"]]
            ratios[str(level["concurrency"])] = {
                metric: round(level[metric]["p50"] / base[metric]["p50"], 3)
                for metric in ("e2e_s", "ttft_s") if level[metric].get("p50") and base[metric].get("p50")}
    return ratios


async def one_request(session: aiohttp.ClientSession, args, model: str, prompt: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
            "stream": args.stream, **sampling_fields(args)}
    if args.stream:
        body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    try:
        async with session.post(f"{args.url}/v1/chat/completions", json=body) as response:
            if response.status != 200:
                return {"error": f"HTTP {response.status}"}
            if args.stream:
                ttft, completion_tokens = await _read_stream(response, started)
            else:
                ttft, completion_tokens = None, (await response.json())["usage"]["completion_tokens"]
    except aiohttp.ClientError as err:
        return {"error": type(err).__name__}
    except StreamError as err:
        return {"error": str(err)}
    e2e = time.perf_counter() - started
    return {"error": None, "ttft_s": ttft if ttft is not None else e2e, "e2e_s": e2e,
            "completion_tokens": completion_tokens}


class StreamError(Exception):
    """An error event inside a 200 stream."""


async def _read_stream(response, started: float) -> tuple[float | None, int]:
    """Time to the first content chunk and the completion's token count, from an SSE stream."""
    ttft, completion_tokens = None, 0
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line.removeprefix("data: "))
        if "error" in chunk:
            raise StreamError(chunk["error"].get("code") or "stream error")
        if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            ttft = time.perf_counter() - started
        if chunk.get("usage"):
            completion_tokens = chunk["usage"]["completion_tokens"]
    return ttft, completion_tokens


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50": round(statistics.median(ordered), 3), "p99": round(p99, 3)}


def baseline(model_name: str, prompts: list[str], max_tokens: int, threads: int | None = None,
             batch: int = 1, dtype_name: str = "auto") -> dict:
    """Plain transformers `generate`, greedy, on the same prompts: `batch` at a time (left-padded)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    from raymed.assets import resolve_pretrained
    from raymed.serve.model_source import serving_dtype

    path = resolve_pretrained(model_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = serving_dtype(dtype_name, on_gpu=device == "cuda")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    latencies, tokens = [], 0
    started = time.perf_counter()
    for first in range(0, len(prompts), batch):
        chats = [[{"role": "user", "content": p}] for p in prompts[first: first + batch]]
        inputs = tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True,
                                               return_tensors="pt", return_dict=True).to(device)
        begun = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        latencies.extend([time.perf_counter() - begun] * len(chats))
        new = out[:, inputs["input_ids"].shape[1]:]
        tokens += int((new != tokenizer.pad_token_id).sum()) if batch > 1 else new.shape[1]
    wall = time.perf_counter() - started
    return {"requests": len(prompts), "batch": batch, "wall_s": round(wall, 2),
            "requests_per_s": round(len(prompts) / wall, 3), "generated_tokens": tokens,
            "generated_tokens_per_s": round(tokens / wall, 2), "e2e_s": percentiles(latencies),
            "device": device, "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads()}


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "cpu_model": _cpu_model()}


def _cpu_model() -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


if __name__ == "__main__":
    main()
