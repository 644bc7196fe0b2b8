"""`train.strategy: fsdp` on real Ray with 2 CPU workers and the ci-tiny model: FSDP losses,
gradients and exported weights match DDP's for every scope; sharding really shards; the
sharded checkpoint resumes on one worker and after a killed worker; the consolidated
Hugging Face directory is the sharded model; a damaged shard is an error naming it.

The CI budget allows two Ray Train runs: the killed-worker run and the six ddp/fsdp × scope
runs share one (`_run_variants`: each a real WorkerLoop with its own config, logs and
checkpoints), the one-worker resume is the other.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch
from corpora import signs_corpus
from transformers import AutoModelForCausalLM

from raymed.config import Config, load_config
from raymed.data.pipeline import build_datasets
from raymed.errors import RaymedError
from raymed.eval import resolve_model_dir
from raymed.train import (
    ADAPTER_DIR,
    EVENTS_FILE,
    METRICS_FILE,
    SHARDED_DIR,
    STATE_FILE,
    WorkerLoop,
    build_model,
    checkpoints_dir,
    fit,
    load_sharded_state,
    load_tokenizer,
    local_state_bytes,
    train_dir,
)
from raymed.train.checkpoint import complete_step

LOSS_TOLERANCE = 1e-4
"""Absolute, on losses near 10: both strategies train in fp32; only the order in which
gradients are summed over ranks differs (DDP's all-reduce, FSDP's reduce-scatter)."""
STATE_RATIO_LIMIT = 0.75
"""FSDP's per-worker parameters + gradients + optimizer state over DDP's; 0.5 is ideal at 2
workers, and anything near 1 means sharding silently stopped."""
STEPS = 4  # the full-scope runs validate and checkpoint at steps 2 and 4
SCOPE_STEPS = 3  # top_layers and lora: one checkpoint, at the end
PROBE_FILE = "probe-rank{rank}.jsonl"

SCOPES = {"full": [f"train.max_steps={STEPS}", "train.eval_every=2"],
          "top_layers": [f"train.max_steps={SCOPE_STEPS}", f"train.eval_every={SCOPE_STEPS}",
                         "train.scope=top_layers", "train.top_layers=1"],
          "lora": [f"train.max_steps={SCOPE_STEPS}", f"train.eval_every={SCOPE_STEPS}", "train.scope=lora",
                   "train.micro_batch_size=2", "train.grad_accum=2"]}
"""lora also accumulates gradients: FSDP's deferred reduce-scatter against DDP's `no_sync`."""
FSDP_OPTIONS = {"full": [], "top_layers": ["train.activation_checkpointing=true"],
                "lora": ["train.fsdp_reshard_after_forward=false"]}
"""Options that must not change what is learned, tried on the way."""


class _Probed(WorkerLoop):
    """The real loop, also recording each step's gradient norm and the bytes of parameters,
    gradients and optimizer state this rank holds (one line per step in PROBE_FILE)."""

    def _apply_gradients(self):
        import ray.train

        held = local_state_bytes(self.params, self.optimizer)  # gradients exist until the step
        norm = super()._apply_gradients()
        held["optimizer"] = local_state_bytes(self.params, self.optimizer)["optimizer"]
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        rank = ray.train.get_context().get_world_rank()
        with (Path(self.config.storage_path) / PROBE_FILE.format(rank=rank)).open("a") as probe:
            probe.write(json.dumps({"step": self.step + 1, "grad_norm": norm.item(), **held}) + "\n")
        return norm


def _run_variants(variants: dict[str, dict], _outer: dict) -> None:
    """Every variant's real loop in turn, in this one worker group. The first, `fsdp-killed`,
    loses rank 1 after its step-2 checkpoint is registered (first attempt only); Ray Train
    restarts the group and it resumes from that checkpoint, the latest registered. The
    others start fresh, not from the checkpoint the variant before them reported."""
    import ray.train
    from faults import kill_rank1_after_checkpoint_once

    killed, *others = variants.values()
    kill_rank1_after_checkpoint_once(killed, at_step=2)
    ray.train.get_checkpoint = lambda: None
    for data in others:
        _Probed(Config.model_validate(data)).run()


def _base(tmp_path: Path) -> list[str]:
    return [f"data.train_path={signs_corpus(tmp_path)}", "data.block_size=64", "data.val_fraction=0.1",
            "data.deterministic=true", "train.warmup_steps=1", "train.keep_checkpoints=20", "train.max_failures=1"]


def _losses(config: Config) -> dict[int, float]:
    """Each step's train loss from metrics.jsonl (a re-run step keeps its last value)."""
    lines = (train_dir(config) / "logs" / METRICS_FILE).read_text().splitlines()
    return {m["step"]: m["train_loss"] for m in map(json.loads, lines)}


def _val_losses(config: Config) -> dict[int, float]:
    lines = (train_dir(config) / "logs" / METRICS_FILE).read_text().splitlines()
    return {m["step"]: m["val_loss"] for m in map(json.loads, lines) if "val_loss" in m}


def _probes(config: Config) -> list[list[dict]]:
    return [[json.loads(line) for line in (Path(config.storage_path) / PROBE_FILE.format(rank=rank))
             .read_text().splitlines()] for rank in range(config.train.num_workers)]


@pytest.fixture(scope="module")
def variants(ray_cluster, default_assets, tmp_path_factory):
    """Seven runs (an fsdp run whose rank 1 is killed, then ddp and fsdp × full, top_layers,
    lora) in one Ray Train run; their configs, checkpoints by step, and the datasets."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    killed = load_config("ci-tiny", [*_base(tmp_path), *SCOPES["full"], "train.strategy=fsdp",
                                     f"storage_path={tmp_path / 'killed'}", "run_name=killed"])
    configs = {"fsdp-killed": killed} | {f"{strategy}-{scope}": load_config("ci-tiny", [
        *_base(tmp_path), *extra, f"train.strategy={strategy}", f"storage_path={tmp_path / strategy / scope}",
        f"run_name={scope}", *(FSDP_OPTIONS[scope] if strategy == "fsdp" else [])])
        for scope, extra in SCOPES.items() for strategy in ("ddp", "fsdp")}
    outer = load_config("ci-tiny", [*_base(tmp_path), f"storage_path={tmp_path / 'all'}", "run_name=all"])
    datasets, _ = build_datasets(outer)
    result = fit(outer, datasets, loop=partial(_run_variants, {n: c.model_dump() for n, c in configs.items()}))
    assert result.error is None
    checkpoints = sorted(d for d in checkpoints_dir(outer).glob("checkpoint_*") if d.is_dir())
    ends = {"killed": [2, 4], "full": [2, 4], "top_layers": [SCOPE_STEPS], "lora": [SCOPE_STEPS]}
    order = [(name, step) for name in configs for step in ends[name.split("-", 1)[1]]]
    assert len(checkpoints) == len(order)
    by_variant: dict[str, dict[int, Path]] = {}
    for (name, step), directory in zip(order, checkpoints):
        assert json.loads((directory / STATE_FILE).read_text())["step"] == step
        assert (directory / SHARDED_DIR).is_dir() == name.startswith("fsdp"), directory
        by_variant.setdefault(name, {})[step] = directory
    return {"configs": configs, "checkpoints": by_variant, "datasets": datasets, "tmp_path": tmp_path}


@pytest.mark.slow
@pytest.mark.parametrize("scope", list(SCOPES))
def test_fsdp_trains_like_ddp(variants, scope):
    """Same losses at every step, same gradient norms (so FSDP's reduce-scatter averages
    over ranks as DDP's all-reduce does: AdamW alone would hide a scale error), and the
    same exported weights."""
    from safetensors.torch import load_file

    ddp, fsdp = variants["configs"][f"ddp-{scope}"], variants["configs"][f"fsdp-{scope}"]
    expected, got = _losses(ddp), _losses(fsdp)
    assert sorted(got) == sorted(expected) == list(range(1, ddp.train.max_steps + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([expected[s] for s in sorted(got)], abs=LOSS_TOLERANCE)
    norms = [[line["grad_norm"] for line in rank] for rank in _probes(ddp) + _probes(fsdp)]
    assert all(n == pytest.approx(norms[0], rel=1e-4) for n in norms[1:])
    exported = {name: load_file(variants["checkpoints"][name][ddp.train.max_steps] / "model.safetensors")
                for name in (f"ddp-{scope}", f"fsdp-{scope}")}
    for tensor_name, tensor in exported[f"ddp-{scope}"].items():
        torch.testing.assert_close(exported[f"fsdp-{scope}"][tensor_name], tensor, rtol=0, atol=1e-5,
                                   msg=f"{scope}: {tensor_name}")
    if scope == "lora":  # merged weights for from_pretrained, the adapter beside them
        adapter = variants["checkpoints"][f"fsdp-{scope}"][SCOPE_STEPS] / ADAPTER_DIR
        assert (adapter / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_fsdp_holds_about_half_the_state_per_worker(variants):
    """Measured from the tensors each rank holds (local shards under FSDP) after step 2,
    when the optimizer state exists."""
    def state_per_rank(name):
        return [sum(line[k] for k in ("params", "grads", "optimizer")) for rank in _probes(variants["configs"][name])
                for line in rank if line["step"] == 2]

    ddp, fsdp = state_per_rank("ddp-full"), state_per_rank("fsdp-full")
    assert len(ddp) == len(fsdp) == 2 and ddp[0] == ddp[1]
    assert max(fsdp) / ddp[0] <= STATE_RATIO_LIMIT, (fsdp, ddp)


@pytest.mark.slow
def test_the_consolidated_directory_is_the_gathered_sharded_model(variants):
    config = variants["configs"]["fsdp-full"]
    checkpoint = variants["checkpoints"]["fsdp-full"][STEPS]
    assert resolve_model_dir(checkpoint) == checkpoint  # raymed eval, the registry and Serve take it
    exported = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    gathered = build_model(config.model, load_tokenizer(config.model))  # DCP reshards to this one process
    optimizer = torch.optim.AdamW(gathered.parameters())
    load_sharded_state(gathered, optimizer, checkpoint)
    assert all(int(state["step"]) == STEPS for state in optimizer.state.values())
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, gathered.eval()(input_ids=ids).logits,
                                   rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_damaged_shard_is_an_error_naming_the_file(variants, tmp_path):
    config = variants["configs"]["fsdp-full"]
    damaged = shutil.copytree(variants["checkpoints"]["fsdp-full"][STEPS], tmp_path / "checkpoint_damaged")
    shard = damaged / SHARDED_DIR / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, loads without complaint unless checked
    shard.write_bytes(bytes(data))
    assert complete_step(damaged) is None  # a restart never picks it as the newest complete one
    model = build_model(config.model, load_tokenizer(config.model))
    with pytest.raises(RaymedError, match=f"checkpoint file {shard} is damaged"):
        load_sharded_state(model, torch.optim.AdamW(model.parameters()), damaged)


@pytest.mark.slow
def test_a_two_worker_checkpoint_resumes_on_one_worker_with_the_same_next_losses(variants):
    """The step-2 checkpoint of the 2-worker run, given to a 1-worker run with a micro-batch
    twice as large (the same global batches): steps 3 and 4 as the 2-worker run had them."""
    two = variants["configs"]["fsdp-full"]
    one = load_config("ci-tiny", [*_base(variants["tmp_path"]), *SCOPES["full"], "train.strategy=fsdp",
                                  "train.num_workers=1", f"train.micro_batch_size={2 * two.train.micro_batch_size}",
                                  f"storage_path={variants['tmp_path'] / 'one-worker'}", "run_name=one"])
    step2 = variants["checkpoints"]["fsdp-full"][2]
    checkpoints_dir(one).mkdir(parents=True)
    shutil.copytree(step2, checkpoints_dir(one) / step2.name)  # complete, not registered: resumed from
    result = fit(one, variants["datasets"])
    assert result.error is None and result.metrics["step"] == STEPS
    events = (train_dir(one) / "logs" / EVENTS_FILE).read_text()
    assert "(complete, not yet registered by Ray Train) at step 2" in events
    expected, got = _losses(two), _losses(one)
    assert sorted(got) == [3, 4]
    assert [got[3], got[4]] == pytest.approx([expected[3], expected[4]], abs=LOSS_TOLERANCE)
    assert result.metrics["val_loss"] == pytest.approx(_val_losses(two)[STEPS], abs=LOSS_TOLERANCE)


@pytest.mark.slow
def test_a_killed_worker_resumes_from_the_sharded_checkpoint_and_matches(variants):
    clean, killed = variants["configs"]["fsdp-full"], variants["configs"]["fsdp-killed"]
    assert (Path(killed.storage_path) / "killed").exists()  # the fault really happened
    last = variants["checkpoints"]["fsdp-killed"][STEPS]
    assert json.loads((last / STATE_FILE).read_text())["attempt_started_at_step"] == 2
    assert f"resumed from checkpoint {variants['checkpoints']['fsdp-killed'][2]} at step 2" in \
        (train_dir(killed) / "logs" / EVENTS_FILE).read_text()
    expected, got = _losses(clean), _losses(killed)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([expected[s] for s in sorted(got)], abs=LOSS_TOLERANCE)
