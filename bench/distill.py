"""Distillation on this machine, in one run: a student of half the teacher's layers
distilled from the teacher, against the same student trained with cross-entropy only (same
steps, same blocks in the same order), and the teacher itself — validation loss and
multiple-choice accuracy (paired-bootstrap CIs against the CE-only student) — then the
serving throughput of the distilled student against the teacher's, each deployed alone on
Serve and loaded by bench/serve_load.py's client (the untrained student too: the same
architecture, for when the distilled one ends its answers early). Prints JSON.

    python bench/distill.py                       # SmolLM2-135M-Instruct → 15 of its 30 layers
    python bench/distill.py --steps 40 --items 200

The teacher is the default model as shipped (`distill.teacher: smollm2-135m-instruct`), the
corpus a slice of the default one (`--train-records`, `--val-records`), so the run fits in
about ten minutes on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (bench/serve_load.py: the load client)


def main() -> None:
    args = _parser().parse_args()
    import ray

    started, report = time.perf_counter(), {"machine": serve_load.machine()}  # its load average at the start too
    with tempfile.TemporaryDirectory(prefix="raymed-bench-distill-") as scratch:
        config = bench_config(Path(scratch), args)
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # 4 logical on 2 cores: Ray Data beside a worker
        models, report["training"] = train_both(config, args)
        report["eval"] = evaluate(models["config"], {k: v for k, v in models.items() if k != "config"})
        served = {label: models[label] for label in ("teacher", "distilled", "student_init")}
        report["serving"] = serve_both(models["config"], served, args)
    report["load_avg_at_end"], report["wall_s"] = _load(), round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="training steps of each student")
    parser.add_argument("--train-records", type=int, default=400)
    parser.add_argument("--val-records", type=int, default=60)
    parser.add_argument("--items", type=int, default=100, help="multiple-choice items scored")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=4, help="clients in flight while serving")
    parser.add_argument("--requests", type=int, default=8, help="requests per served model")
    parser.add_argument("--max-tokens", type=int, default=24)
    return parser


def bench_config(scratch: Path, args):
    """The distillation config: 1 worker, micro-batch 4 × 128, every other teacher layer."""
    from raymed.assets import resolve_corpus
    from raymed.config import load_config

    train, validation = resolve_corpus("medical-v1", None)
    corpus = scratch / "corpus"
    corpus.mkdir()
    for name, source, count in [("train", train, args.train_records), ("validation", validation, args.val_records)]:
        with open(source) as lines:
            (corpus / f"{name}.jsonl").write_text("".join(line for _, line in zip(range(count), lines)))
    layers = list(range(0, 30, 2))
    return load_config("cpu-demo", [
        f"storage_path={scratch / 'store'}", "run_name=bench-distill", f"data.train_path={corpus / 'train.jsonl'}",
        f"data.validation_path={corpus / 'validation.jsonl'}", "data.max_validation_records=null",
        "data.block_size=128", "data.deterministic=true", "train.num_workers=1", "train.cpus_per_worker=2",
        "train.scope=full", "train.top_layers=null", "train.lr=3e-4", "train.warmup_steps=2",
        f"train.max_steps={args.steps}", f"train.eval_every={args.steps}", "train.micro_batch_size=4",
        "distill.teacher=smollm2-135m-instruct", f"distill.student_layers={layers}", f"distill.alpha={args.alpha}",
        f"distill.temperature={args.temperature}", f"eval.max_items={args.items}", "serve.grounding=false",
        "serve.num_cpus=1", "serve.max_batch_size=8"])


def train_both(config, args) -> tuple[dict, dict]:
    """The distilled student and the CE-only one, trained on the same blocks; their model
    directories (with the teacher's and the untrained student's) and their training figures."""
    from raymed.config import with_values
    from raymed.data.pipeline import build_datasets
    from raymed.distill.loop import distill_loop_per_worker
    from raymed.distill.student import prepare_run
    from raymed.train import fit

    run_config = prepare_run(config)
    datasets, _ = build_datasets(run_config)
    runs = {"distilled": (run_config, distill_loop_per_worker),
            "ce_only": (with_values(run_config, {"run_name": "bench-ce-only"}), None)}
    models, figures = {"config": run_config, "teacher": run_config.distill.teacher,
                       "student_init": run_config.model.name}, {}
    for name, (run, loop) in runs.items():
        began = time.perf_counter()
        result = fit(run, datasets, loop=loop) if loop else fit(run, datasets)
        models[name] = result.checkpoint.path
        figures[name] = {"wall_s": round(time.perf_counter() - began, 1),
                         **{k: result.metrics.get(k) for k in ("train_loss", "ce_loss", "kd_loss", "val_loss",
                                                                "tokens_per_s")}}
    figures["steps"], figures["alpha"], figures["temperature"] = args.steps, args.alpha, args.temperature
    return models, figures


def evaluate(config, models: dict[str, str]) -> dict:
    """Every model's validation loss and multiple-choice accuracy on the same blocks and
    items; accuracy differences against the CE-only student with their CIs."""
    from raymed.eval import build_report, evaluate_models

    items, results = evaluate_models(config, models)
    report = build_report(config, items, results, reference="ce_only")
    keep = ("val_loss", "val_ppl", "val_token_acc", "mcq_acc")
    return {"items": len(items), "confidence": config.eval.confidence,
            "models": {label: {k: round(v, 4) for k, v in r.metrics.items() if k in keep} for label, r in results.items()},
            "vs_ce_only": {label: {k: v for k, v in comparison.items() if k in keep}
                           for label, comparison in report["comparisons"].items()}}


def serve_both(config, models: dict[str, str], args) -> dict:
    """Each model alone on one Serve replica (one CPU), the same prompts through
    serve_load's client; generated tokens/s and latency, and each student's speed-up over
    the teacher. Tokens/s compare only at the same generated length (a student that ends its
    answers early has fewer tokens to spread the fixed costs over): `same_length` says so;
    the untrained student, of the same architecture, rarely ends early."""
    from ray import serve

    from raymed.config import with_values
    from raymed.serve.deploy import APP_NAME, deploy

    prompts = serve_load.load_prompts(args.requests)
    client = serve_load._parser().parse_args(["--max-tokens", str(args.max_tokens), "--warmup", "1"])
    levels = {}
    for label, directory in models.items():
        deployment = deploy(with_values(config, {"serve.model": directory, "serve.model_name": label}))
        client.url = deployment.url.removesuffix("/v1")
        levels[label] = asyncio.run(serve_load.run_level(client, label, prompts, args.concurrency))
        levels[label]["load_avg"] = _load()
        serve.delete(APP_NAME)
    teacher = levels["teacher"]
    speedups = {label: {"tokens_per_s_vs_teacher": round(level["generated_tokens_per_s"]
                                                         / teacher["generated_tokens_per_s"], 2),
                        "same_length": level["generated_tokens"] == teacher["generated_tokens"]}
                for label, level in levels.items() if label != "teacher"}
    return {"levels": levels, "vs_teacher": speedups, "max_tokens": args.max_tokens, "concurrency": args.concurrency}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


if __name__ == "__main__":
    main()
