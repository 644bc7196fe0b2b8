"""The end-to-end pipeline: assets → index → data → train (one fine-tune, or a sweep) → evaluate →
promote → (distill) → deploy → ask, all under one run directory, `<storage_path>/runs/<run_name>/`
(a distillation's own in `runs/<run_name>-distill/`):

    pipeline/<stage>.json   each stage's record: status, fingerprint, outputs, seconds
    pipeline/summary.json   the last run: per stage, ran or skipped, and its wall time
    data/{train,validation}/  the packed token blocks (parquet)
    train/ or tune/         Ray Train's checkpoints, or the sweep (raymed.train, raymed.sweep)
    eval/                   the candidate's evaluation report
    promote/                the gate's report (candidate against the registry's current version)

A stage's fingerprint hashes the config fields it depends on and its upstream stages'
fingerprints (the assets stage's is a hash of the built files' checksums, so a changed
corpus counts). A stage whose record is complete, whose fingerprint matches and whose
output paths exist is skipped (the promote stage only while the registry's current version
is still the one its gate left: after an outside `raymed promote` or `registry rollback`
the gate runs again); otherwise it runs: after a crash with the same inputs it
continues (training resumes from its latest checkpoint, a sweep from its experiment),
after a change of inputs its stale outputs are removed first. `assets` (a cheap checksum
check that builds only what is missing), `deploy` and `ask` (their outputs live in the
cluster, not on disk) run every time.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from raymed.config import Config
from raymed.console import init_ray, say
from raymed.errors import RaymedError
from raymed.index.build import index_stage
from raymed.stages import Stage, StageRun, fingerprint, run_stages

RECORDS_DIR = "pipeline"
SUMMARY_FILE = "summary.json"


# ---------------------------------------------------------------- raymed's stages

def run_dir(config: Config) -> Path:
    return Path(config.storage_path).expanduser() / "runs" / config.run_name


@dataclass
class PipelineResult:
    stages: dict[str, StageRun]
    directory: Path

    def timings(self) -> dict[str, dict]:
        return {name: {"status": s.status, "seconds": round(s.seconds, 2)} for name, s in self.stages.items()}


def run_pipeline(config: Config, log: Callable[[str], None] = say) -> PipelineResult:
    """Every stage for `config`, on the Ray cluster in reach (RAY_ADDRESS) or a local one;
    leaves the model deployed on Serve."""
    directory = run_dir(config)
    log(f"[pipeline] run directory: {directory}")
    started = time.monotonic()
    stages = run_stages(raymed_stages(config, log), directory / RECORDS_DIR, log)
    result = PipelineResult(stages, directory)
    summary = {"run": config.run_name, "seconds": round(time.monotonic() - started, 2), "stages": result.timings()}
    (directory / RECORDS_DIR / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return result


def _task_tokens(config: Config) -> dict:
    """The data stage's dependence on `model.add_tokens` (none when there are none, so runs
    without task tokens keep their stage fingerprints)."""
    return {"add_tokens": config.model.model_dump()["add_tokens"]} if config.model.add_tokens else {}


def raymed_stages(config: Config, log: Callable[[str], None]) -> list[Stage]:
    """The pipeline's stages for `config`, each with the config fields it depends on."""
    c = config
    training = {"model": c.model.model_dump(), "train": c.train.model_dump(), "seed": c.seed,
                "tune": c.tune.model_dump() if c.pipeline.tune else None}
    return [
        Stage("assets", lambda up: assets_stage(), inputs=None),
        Stage("index", lambda up: index_stage(c), inputs=None, upstream=("assets",)),  # the knowledge index
        Stage("data", lambda up: data_stage(c), upstream=("assets",), clear=lambda: _remove(data_dir(c)),
              inputs=lambda: {"data": c.data.model_dump(), "tokenizer": c.model.tokenizer or c.model.name,
                              "seed": c.seed, "corpus": _corpus_digest(c), **_task_tokens(c)}),
        Stage("train", lambda up: train_stage(c), upstream=("data",), clear=lambda: _remove_training(c),
              inputs=lambda: training),
        Stage("evaluate", lambda up: evaluate_stage(c, up["train"]), upstream=("train",),
              clear=lambda: _remove(run_dir(c) / "eval"),
              inputs=lambda: {"eval": c.eval.model_dump(), "data": c.data.model_dump(), "seed": c.seed}),
        Stage("promote", lambda up: promote_stage(c, up["train"], up["evaluate"], log), upstream=("train", "evaluate"),
              clear=lambda: _remove(run_dir(c) / "promote"),
              inputs=lambda: {"eval": c.eval.model_dump(), "registry": c.registry.model_dump(),
                              "storage": c.storage_path},
              still_true=lambda outputs: _registry_current(c) == outputs["current"]),
        *([distill_stage_of(c, log)] if c.pipeline.distill else []),
        Stage("deploy", lambda up: deploy_stage(c), inputs=None, upstream=("promote",)),
        Stage("ask", lambda up: ask_stage(c, up["deploy"], up["promote"], log), inputs=None,
              upstream=("deploy", "promote")),
    ]


def assets_stage() -> dict:
    """Build what is missing from RAYMED_CACHE (a checksum check when all is there)."""
    from raymed.assets import ASSETS, build_assets
    from raymed.assets.cache import default_cache_dir, read_manifest

    statuses = build_assets()
    built = [s.name for s in statuses if s.state == "built"]
    say(f"[pipeline] assets built: {', '.join(built)}" if built else "[pipeline] assets: all present and intact")
    root = default_cache_dir()
    files = {asset.name: (read_manifest(asset, root) or {}).get("files") for asset in ASSETS}
    return {"cache": str(root), "digest": fingerprint(files)}  # the same files: the same fingerprint


def data_dir(config: Config) -> Path:
    return run_dir(config) / "data"


def data_stage(config: Config) -> dict:
    """Tokenize and pack the corpus with Ray Data; write the blocks as parquet."""
    from raymed.data.pipeline import build_datasets

    init_ray()
    datasets, stats = build_datasets(config)
    paths = []
    for split, dataset in datasets.items():
        out = data_dir(config) / split
        dataset.write_parquet(str(out))
        paths.append(str(out))
    summary = {k: v for k, v in asdict(stats).items() if k != "example_lengths"}
    return {"paths": paths, "stats": summary | {"packing_efficiency": round(stats.packing_efficiency, 4)}}


def load_blocks(config: Config) -> dict:
    """The data stage's packed blocks as Ray Datasets keyed `train` and `validation`, read
    into the object store now: once training starts, its workers may hold every CPU, and a
    read task scheduled then would wait forever (as the data stage's own output does)."""
    import ray.data

    return {split: ray.data.read_parquet(str(data_dir(config) / split)).materialize()
            for split in ("train", "validation")}


def train_stage(config: Config) -> dict:
    """One Ray Train fine-tune, or (pipeline.tune) a Ray Tune sweep; the best checkpoint."""
    from raymed.train.progress import training_progress

    init_ray()
    datasets = load_blocks(config)
    if config.pipeline.tune:
        from ray import tune

        from raymed.sweep import EXPERIMENT, run_sweep, sweep_dir

        resume = tune.Tuner.can_restore(str(sweep_dir(config) / EXPERIMENT))
        with training_progress(config, sweep=True):
            result = run_sweep(config, datasets, resume=resume)
        best = result.best
        return {"candidate": best.best_checkpoint, "source": f"{config.run_name}/tune/{best.trial}",
                "metrics": {config.tune.metric: best.best, "step": best.best_step}, "paths": [best.best_checkpoint]}
    from raymed.train import fit

    with training_progress(config):
        result = fit(config, datasets)
    checkpoint = _best_checkpoint(result, config)
    return {"candidate": checkpoint, "source": f"{config.run_name}/train", "metrics": result.metrics or {},
            "paths": [checkpoint]}


def _best_checkpoint(result, config: Config) -> str:
    try:
        checkpoint = result.get_best_checkpoint(config.tune.metric, config.tune.mode)
    except (RuntimeError, ValueError):  # no checkpoint reported the metric
        checkpoint = None
    checkpoint = checkpoint or result.checkpoint
    if checkpoint is None:
        raise RaymedError("training reported no checkpoint")
    return checkpoint.path


def evaluate_stage(config: Config, trained: dict) -> dict:
    """The candidate's validation metrics on the data stage's validation blocks and its
    multiple-choice accuracy, both as Ray Data batch inference; the registry's current
    version is scored in the same pass when its scores are not cached yet (the promote
    stage then reuses both)."""
    from raymed.eval import (build_report, load_items, resolve_items_path, resolve_model_dir, tokenizer_digest,
                             validation_blocks, write_report)
    from raymed.eval.suite import results_from
    from raymed.promote import VersionScores, ensure_base
    from raymed.registry import Registry

    init_ray()
    models = {"candidate": resolve_model_dir(trained["candidate"])}
    items_path = resolve_items_path(config.eval.mcq_path)
    items = load_items(items_path, max_items=config.eval.max_items, seed=config.seed)
    registry = Registry.for_config(config)
    current, scores = ensure_base(registry, config), VersionScores(registry, config, items, validation=True)
    if current is not None and scores.get(current) is None:
        models[current] = registry.path(current)
    blocks = load_blocks(config)["validation"]
    candidate_tokenizer = tokenizer_digest(models["candidate"])
    validation = {label: blocks if tokenizer_digest(directory) == candidate_tokenizer
                  else validation_blocks(config, directory) for label, directory in models.items()}
    results = results_from(config, models, items, validation)
    if current in results:
        scores.put(current, results[current])
    report = build_report(config, items, results, reference=current if current in results else None,
                          items_path=str(items_path))
    path, _ = write_report(report, run_dir(config) / "eval")
    return {"metrics": results["candidate"].metrics, "report": str(path), "paths": [str(path)]}


def promote_stage(config: Config, trained: dict, evaluated: dict, log: Callable[[str], None]) -> dict:
    """The gate: the candidate (its scores from the evaluate stage) against the registry's
    current version; promoted if better."""
    from raymed.promote import promote_best

    init_ray()
    result = promote_best([trained["candidate"]], config, source=trained["source"],
                          out_dir=run_dir(config) / "promote", scored_report=evaluated["report"])
    log(f"[pipeline] gate: {result.reason}")
    return {"accepted": result.accepted, "reason": result.reason, "version": result.version,
            "previous": result.previous, "current": result.current, "report": str(result.report_path),
            "paths": [str(result.report_path)]}


def distill_stage_of(config: Config, log: Callable[[str], None]) -> Stage:
    """With `pipeline.distill`: the registry's current version (as the gate left it) taught
    to the `distill` section's student, gated into the student's own registry model."""
    from raymed.distill.student import distill_dir

    c = config
    return Stage("distill", lambda up: distill_stage(c, log), upstream=("data", "promote"),
                 clear=lambda: _remove(distill_dir(c)),
                 inputs=lambda: {"distill": c.distill.model_dump(), "model": c.model.model_dump(),
                                 "train": c.train.model_dump(), "eval": c.eval.model_dump(),
                                 "registry": c.registry.model_dump(), "storage": c.storage_path, "seed": c.seed})


def distill_stage(config: Config, log: Callable[[str], None]) -> dict:
    """Distill on the data stage's blocks (the student has the teacher's vocabulary), then
    the student's gate."""
    from raymed.distill.run import distill, serve_hint
    from raymed.train.progress import training_progress

    init_ray()
    done = distill(config, progress=training_progress, datasets=load_blocks(config))
    log(f"[pipeline] student gate: {done.promotion.reason}")
    log(f"[pipeline] {serve_hint(done.config, done.promotion.current)}")
    return {"registry": done.config.registry.name, "accepted": done.promotion.accepted,
            "current": done.promotion.current, "report": str(done.promotion.report_path),
            "paths": [str(done.promotion.report_path)]}


def deploy_stage(config: Config) -> dict:
    """Deploy (or roll forward to) the registry's current version on Ray Serve."""
    from raymed.serve.deploy import deploy

    init_ray()
    deployment = deploy(config)
    return {"url": deployment.url, "model": deployment.model, "version": deployment.version,
            "auth": deployment.auth}


def ask_stage(config: Config, deployment: dict, promotion: dict, log: Callable[[str], None]) -> dict:
    """One real chat request to the deployed endpoint; the answer and which version gave it."""
    text, finish_reason = ask(config, deployment["url"], deployment["model"], config.pipeline.question)
    answer = complete_answer(text, finish_reason, config.pipeline.max_tokens)
    version = deployment["version"]
    if promotion["accepted"] and version == promotion["version"]:
        served = f"{deployment['model']} {version}, promoted from this run's candidate"
    else:
        served = f"{deployment['model']} {version}, the current version"
        if not promotion["accepted"]:
            log(f"[pipeline] the candidate was not promoted: {promotion['reason']}")
    log(f"[pipeline] question: {config.pipeline.question}")
    log(f"[pipeline] answer from {served} ({deployment['url']}):\n{answer}")
    return {"question": config.pipeline.question, "answer": answer, "model": deployment["model"],
            "version": version, "url": deployment["url"]}


def ask(config: Config, url: str, model: str, question: str, timeout_s: float = 300) -> tuple[str, str]:
    """POST /chat/completions (greedy): the answer's text and its finish_reason."""
    from raymed.serve.app import api_key

    body = {"model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": config.pipeline.max_tokens, "temperature": 0}
    headers = {"Content-Type": "application/json"}
    key = api_key(config)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(f"{url}/chat/completions", data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            reply = json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise RaymedError(f"{url}/chat/completions answered {err.code}: {err.read()[:300]!r}") from None
    except OSError as err:
        raise RaymedError(f"no answer from {url}/chat/completions: {err}") from None
    choice = reply["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


SENTENCE_END = re.compile(r"""[.!?]["')\]]*(?=\s|$)""")


def complete_answer(text: str, finish_reason: str, max_tokens: int) -> str:
    """The answer as the pipeline shows it: as it is when the model ended its turn; when it
    was cut at `max_tokens` ("length"), trimmed to its last full sentence, with a note."""
    if finish_reason != "length":
        return text
    ends = [match.end() for match in SENTENCE_END.finditer(text)]
    limit = f"the answer reached pipeline.max_tokens={max_tokens}"
    if not ends:
        return f"{text.rstrip()} … (unfinished: {limit})"
    return f"{text[:ends[-1]]}\n(trimmed to its last full sentence: {limit})"


def _corpus_digest(config: Config) -> str:
    from raymed.promote import data_fingerprint

    digest = data_fingerprint(config)
    return fingerprint([digest["sha256"], digest["not_hashed"]])


def _registry_current(config: Config) -> str | None:
    """The registry's current version now (a `raymed promote` or `registry rollback` outside
    the pipeline moves it, and the gate must then run again)."""
    from raymed.registry import Registry

    return Registry.for_config(config).current()


def _remove_training(config: Config) -> None:
    from raymed.sweep import sweep_dir
    from raymed.train import train_dir

    _remove(train_dir(config))
    _remove(sweep_dir(config))


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
