"""Ray Train fine-tuning: metrics by hand, frozen layers, and a real 2-worker run that
checkpoints, loads with from_pretrained, and resumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from corpora import signs_corpus
from transformers import AutoConfig, AutoModelForCausalLM

from raymed.config import TrainConfig, load_config
from raymed.data.pipeline import build_datasets
from raymed.errors import RaymedError
from raymed.eval import score_blocks
from raymed.train import (
    ADAPTER_DIR,
    COMPLETE_FILE,
    EVENTS_FILE,
    METRICS_FILE,
    STATE_FILE,
    apply_scope,
    fit,
    load_checkpoint_model,
    read_losses,
    save_checkpoint_model,
    token_metrics,
    train_dir,
)

# First four training losses of the ci-tiny run below (seed 0, deterministic data, 2 gloo
# workers), recorded on 2026-12-01. A change that moves them is a change in training.
# (Since 2026-11-25 they are the token-weighted mean over both ranks, not rank 0's
# mean, and the gradients weigh every labelled token alike.)
GOLDEN_LOSSES = [10.849102, 10.829636, 10.526369, 10.393545]


def test_token_metrics_match_a_hand_checked_case():
    # Two positions are scored (labels at t=1,2); position t's logits predict token t+1.
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 0, 2]])
    loss, correct, count = token_metrics(logits, labels)
    expected = -math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(math.exp(3) / (math.exp(3) + 2))
    assert count == 2 and correct == 2
    assert loss == pytest.approx(expected, rel=1e-6)
    _, correct, _ = token_metrics(logits, torch.tensor([[-100, 1, 2]]))
    assert correct == 1


def test_read_losses_fills_floats_and_names_the_first_bad_step():
    from raymed.errors import RaymedError

    pending = [{"step": 4, "train_loss": torch.tensor(2.5)}, {"step": 5, "train_loss": torch.tensor(1.25)}]
    read_losses(pending)
    assert pending == [{"step": 4, "train_loss": 2.5}, {"step": 5, "train_loss": 1.25}]
    assert all(type(m["train_loss"]) is float for m in pending)
    bad = [{"step": s, "train_loss": torch.tensor(v)} for s, v in [(2, 1.0), (3, math.nan), (4, math.inf)]]
    with pytest.raises(RaymedError, match="loss is nan at step 3"):
        read_losses(bad)


def _tiny_llama(layers: int = 3, tied: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", vocab_size=64, hidden_size=16, intermediate_size=32,
                                  num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                  tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(config)


def _one_step(model) -> dict[str, torch.Tensor]:
    """Parameters before one AdamW step on random tokens."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return before


def test_top_layers_freezes_everything_below():
    model = apply_scope(_tiny_llama(), TrainConfig(scope="top_layers", top_layers=1))
    before = _one_step(model)
    for name, param in model.named_parameters():
        frozen = "layers.2." not in name and "lm_head" not in name
        assert torch.equal(param, before[name]) == frozen, name


def test_top_layers_keeps_a_tied_embedding_frozen():
    # SmolLM2 ties its output head to the input embedding: training the head would move the
    # bottom of the model too, so with top_layers only the top blocks train.
    model = apply_scope(_tiny_llama(tied=True), TrainConfig(scope="top_layers", top_layers=1))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    before = _one_step(model)
    changed = {name for name, param in model.named_parameters() if not torch.equal(param, before[name])}
    assert changed and all("layers.2." in name for name in changed)
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])


def test_resuming_from_weights_that_miss_or_add_tensors_is_an_error_naming_them(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _tiny_llama()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_file(missing, tmp_path / "model.safetensors")
    with pytest.raises(RaymedError, match=r"does not match the model .*missing model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint_model(_tiny_llama(), tmp_path)
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(RaymedError, match=r"unexpected model\.extra\.weight"):
        load_checkpoint_model(_tiny_llama(), tmp_path)
    save_file(tensors, tmp_path / "model.safetensors")
    load_checkpoint_model(_tiny_llama(), tmp_path)  # the complete file loads


def test_a_tied_model_resumes_strictly_from_its_own_checkpoint(tmp_path):
    # save_pretrained stores a tied weight once; strict loading must not call the head missing.
    model = _tiny_llama(tied=True)
    model.save_pretrained(tmp_path)
    resumed = _tiny_llama(tied=True, seed=1)
    load_checkpoint_model(resumed, tmp_path)
    assert torch.equal(resumed.lm_head.weight, model.lm_head.weight)


def test_lora_trains_only_adapters_and_checkpoints_merged_weights(default_assets, tmp_path):
    from transformers import AutoTokenizer

    from raymed.assets import resolve_pretrained

    model = apply_scope(_tiny_llama(), TrainConfig(scope="lora", lora_r=4))
    before = _one_step(model)
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed)
    assert any("lora_B" in name for name in changed)  # B starts at zero: moving it changes outputs

    save_checkpoint_model(model, AutoTokenizer.from_pretrained(resolve_pretrained("gpt2")), tmp_path)
    assert (tmp_path / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # loads as it is
        assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
        resumed = apply_scope(_tiny_llama(), TrainConfig(scope="lora", lora_r=4)).eval()
        load_checkpoint_model(resumed, tmp_path)
        assert torch.allclose(resumed(input_ids=ids).logits, expected, atol=1e-6)


@pytest.mark.slow
def test_two_workers_train_checkpoint_and_resume(ray_cluster, default_assets, tmp_path):
    corpus = signs_corpus(tmp_path)
    base = [f"data.train_path={corpus}", "data.block_size=64", "data.val_fraction=0.1",
            "data.deterministic=true", f"storage_path={tmp_path}", "run_name=resume-test",
            "train.eval_every=2"]
    config = load_config("ci-tiny", [*base, "train.max_steps=4", "train.warmup_steps=1"])
    datasets, _ = build_datasets(config)
    result = fit(config, datasets)
    assert result.error is None
    assert result.metrics["step"] == 4
    logged = [json.loads(line) for line in (train_dir(config) / "logs" / METRICS_FILE).read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2, 3, 4]
    assert [m["train_loss"] for m in logged] == pytest.approx(GOLDEN_LOSSES, abs=1e-4)
    # Each line's lr is the rate its step trained at: linear warmup from 0 over 1 step, then decay.
    assert [m["lr"] for m in logged] == pytest.approx([0.0, 1e-3, 2e-3 / 3, 1e-3 / 3])
    assert list((train_dir(config) / "logs").glob("events.out.tfevents.*"))
    assert all(math.isfinite(result.metrics[k]) for k in ("train_loss", "val_loss", "val_ppl"))
    checkpoint = Path(result.checkpoint.path)
    assert json.loads((checkpoint / STATE_FILE).read_text())["step"] == 4
    model = AutoModelForCausalLM.from_pretrained(checkpoint)  # loads as it is
    assert model.config.num_hidden_layers == 2

    # Validation scores every block, as `raymed eval` does: the same val_loss on the same
    # checkpoint and blocks, though the blocks do not fill whole global batches.
    assert datasets["validation"].count() % (2 * config.train.micro_batch_size) != 0
    evaluated = score_blocks({"final": checkpoint}, {"final": datasets["validation"]}, config.eval)["final"]
    assert result.metrics["val_loss"] == pytest.approx(evaluated["val_loss"], rel=1e-5)

    # A checkpoint directory Ray Train never registered (as a crash mid-write leaves one)
    # must not be picked up, even though it looks newer and further along.
    run_dir = checkpoint.parent
    half_written = run_dir / "checkpoint_2099-01-01_00-00-00.000000"
    half_written.mkdir()
    (half_written / STATE_FILE).write_text(json.dumps({"step": 5, "data_position": 99}))
    (half_written / "model.safetensors").write_bytes(b"\0" * 10)
    # Its completion mark lists a file that is not what was written: still ignored.
    (half_written / COMPLETE_FILE).write_text(json.dumps(
        {"step": 5, "files": {"model.safetensors": {"size": 10, "sha256": "0" * 64}}}))

    longer = load_config("ci-tiny", [*base, "train.max_steps=8", "train.warmup_steps=1"])
    resumed = fit(longer, datasets)
    assert resumed.error is None and resumed.metrics["step"] == 8
    state = json.loads((Path(resumed.checkpoint.path) / STATE_FILE).read_text())
    assert state["attempt_started_at_step"] == 4  # resumed, not restarted from step 0, nor from the 2099 one
    events = (train_dir(config) / "logs" / EVENTS_FILE).read_text()
    assert f"resumed from checkpoint {checkpoint} at step 4" in events

    # Checkpoints at steps 2, 4, 6, 8; the two with the lowest val_loss stay on disk.
    val_loss = {m["step"]: m["val_loss"] for m in map(json.loads, (train_dir(config) / "logs" / METRICS_FILE)
                                                    .read_text().splitlines()) if "val_loss" in m}
    kept = {json.loads((d / STATE_FILE).read_text())["step"]
            for d in run_dir.glob("checkpoint_*") if d.is_dir() and d != half_written}
    assert kept == set(sorted(val_loss, key=val_loss.get)[:2])


def _varied_answers_corpus(directory: Path) -> Path:
    """Answers of 1 to 9 extra words, so packed blocks hold different numbers of labelled tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / "qa.jsonl"
    corpus.write_text("".join(json.dumps({"question": f"What is sign {i}?",
                                          "answer": " ".join([f"Sign {i} suggests"] + ["infection"] * (i % 9 + 1))})
                              + "\n" for i in range(80)))
    return corpus


@pytest.mark.slow
def test_the_loss_weighs_every_labelled_token_alike_across_micro_batches_and_ranks(
        ray_cluster, default_assets, tmp_path):
    """One step over the same four blocks, split three ways (one micro-batch of 4; 2 × 2
    accumulated; 2 workers × 2): the same weights after the step and the same train_loss.
    A mean of per-micro-batch means (or DDP's equal average of ranks) would weigh the blocks'
    tokens unequally, since the blocks hold different numbers of labelled tokens."""
    from safetensors.torch import load_file

    base = [f"data.train_path={_varied_answers_corpus(tmp_path)}", "data.block_size=64", "data.val_fraction=0.1",
            "data.deterministic=true", "train.max_steps=1", "train.warmup_steps=0", "train.eval_every=1"]
    ways = {"one_batch_of_4": ["train.num_workers=1", "train.micro_batch_size=4"],
            "accumulate_2x2": ["train.num_workers=1", "train.micro_batch_size=2", "train.grad_accum=2"],
            "two_workers_x2": ["train.num_workers=2", "train.micro_batch_size=2"]}
    configs = {way: load_config("ci-tiny", [*base, *extra, f"storage_path={tmp_path / way}", f"run_name={way}"])
               for way, extra in ways.items()}
    datasets, _ = build_datasets(configs["one_batch_of_4"])
    counts = [int((torch.tensor(row["labels"])[1:] != -100).sum()) for row in datasets["train"].take(4)]
    assert counts[0] + counts[1] != counts[2] + counts[3]  # the halves weigh differently by token count

    weights, losses = {}, {}
    for way, config in configs.items():
        result = fit(config, datasets)
        weights[way] = load_file(Path(result.checkpoint.path) / "model.safetensors")
        losses[way] = result.metrics["train_loss"]
    for way in ("accumulate_2x2", "two_workers_x2"):
        assert losses[way] == pytest.approx(losses["one_batch_of_4"], rel=1e-6), way
        for name, tensor in weights["one_batch_of_4"].items():  # fp32: summation order only
            torch.testing.assert_close(weights[way][name], tensor, rtol=0, atol=1e-6, msg=f"{way}: {name}")


def _nan_after_step_2(config_data: dict) -> None:
    """The real loop, with a weight turned to NaN before step 3 (as a diverging run does)."""
    from raymed.config import Config
    from raymed.train import WorkerLoop

    class Diverging(WorkerLoop):
        def _train_step(self, stream):
            if self.step == 2:
                with torch.no_grad():
                    next(self.model.parameters()).fill_(float("nan"))
            return super()._train_step(stream)

    Diverging(Config.model_validate(config_data)).run()


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(ray_cluster, default_assets, tmp_path):
    from raymed.errors import RaymedError

    config = load_config("ci-tiny", [f"data.train_path={signs_corpus(tmp_path)}", "data.block_size=64",
                                     "data.val_fraction=0.1", f"storage_path={tmp_path}", "run_name=nan",
                                     "train.eval_every=2", "train.max_steps=6", "train.warmup_steps=1",
                                     "train.max_failures=0"])
    datasets, _ = build_datasets(config)
    with pytest.raises(RaymedError, match=r"training failed after 0 retries \(rank 0: .*loss is nan at step 3"):
        fit(config, datasets, loop=_nan_after_step_2)
    checkpoints = [d for d in (train_dir(config) / "nan").glob("checkpoint_*") if d.is_dir()]
    assert len(checkpoints) == 1
    last_good = checkpoints[0]
    assert json.loads((last_good / STATE_FILE).read_text())["step"] == 2
    model = AutoModelForCausalLM.from_pretrained(last_good)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_truncated_checkpoint_weights_name_the_file(tmp_path):
    from raymed.errors import RaymedError

    (tmp_path / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(RaymedError, match=f"checkpoint file {tmp_path / 'model.safetensors'} is unreadable"):
        load_checkpoint_model(_tiny_llama(), tmp_path)


CRASH_STEP = 4  # a validation step: the loop reports (and checkpoints) at steps 2, 4, 6


def _die_before_registration_on_rank0(config_data: dict) -> None:
    """The real loop, with rank 0 dying (os._exit) on the first attempt in the window
    between its step-CRASH_STEP checkpoint reaching storage and Ray Train registering it:
    inside the upload, once the copy's completion mark verifies. A marker file makes the
    fault one-shot."""
    import os
    import shutil

    import ray.train

    from raymed.train import train_loop_per_worker
    from raymed.train.checkpoint import complete_step

    marker = Path(config_data["storage_path"]) / "crashed"
    real_report = ray.train.report

    def upload_then_die(checkpoint, directory_name):
        target = Path(ray.train.get_context().get_storage().experiment_fs_path) / directory_name
        shutil.copytree(checkpoint.path, target)
        if complete_step(target) == CRASH_STEP:  # the condition: every file there and checksummed
            marker.touch()
            os._exit(1)
        raise AssertionError(f"the copied checkpoint {target} is not complete")

    def report(metrics, checkpoint=None, **kwargs):
        if metrics["step"] == CRASH_STEP and checkpoint is not None and not marker.exists():
            kwargs["checkpoint_upload_fn"] = upload_then_die
        real_report(metrics, checkpoint=checkpoint, **kwargs)

    ray.train.report = report
    train_loop_per_worker(config_data)


def _losses_by_step(config) -> dict[int, float]:
    """Each step's train loss from metrics.jsonl (a re-run step keeps its last value)."""
    lines = (train_dir(config) / "logs" / METRICS_FILE).read_text().splitlines()
    return {m["step"]: m["train_loss"] for m in map(json.loads, lines)}


@pytest.mark.slow
def test_a_worker_killed_before_its_checkpoint_is_registered_resumes_from_it_and_matches(
        ray_cluster, default_assets, tmp_path):
    corpus = signs_corpus(tmp_path)
    common = [f"data.train_path={corpus}", "data.block_size=64", "data.val_fraction=0.1",
              "data.deterministic=true", "train.eval_every=2", "train.max_steps=6",
              "train.warmup_steps=1", "train.max_failures=1"]
    clean = load_config("ci-tiny", [*common, f"storage_path={tmp_path / 'clean'}", "run_name=clean"])
    faulty = load_config("ci-tiny", [*common, f"storage_path={tmp_path / 'faulty'}", "run_name=faulty"])
    datasets, _ = build_datasets(clean)
    assert fit(clean, datasets).error is None
    result = fit(faulty, datasets, loop=_die_before_registration_on_rank0)
    assert (tmp_path / "faulty" / "crashed").exists()  # the fault really happened
    assert result.error is None and result.metrics["step"] == 6
    state = json.loads((Path(result.checkpoint.path) / STATE_FILE).read_text())
    assert state["attempt_started_at_step"] == CRASH_STEP  # from the unregistered checkpoint, not step 2
    events = (train_dir(faulty) / "logs" / EVENTS_FILE).read_text()
    assert f"(complete, not yet registered by Ray Train) at step {CRASH_STEP}" in events
    expected, got = _losses_by_step(clean), _losses_by_step(faulty)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert [got[s] for s in range(1, 7)] == pytest.approx([expected[s] for s in range(1, 7)], abs=1e-4)
    # Once the run is done, the checkpoint Ray never registered is gone: only its top-K stay.
    steps = sorted(json.loads((d / STATE_FILE).read_text())["step"]
                   for d in (train_dir(faulty) / "faulty").glob("checkpoint_*") if d.is_dir())
    assert CRASH_STEP not in steps and len(steps) == faulty.train.keep_checkpoints


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.init=pretrained", "model.architecture={}", "model.name=smollm2-135m-instruct",
          "model.tokenizer=gpt2"], "the tokenizer has 50257 tokens but the model's embedding has 49152 rows"),
        (["data.block_size=512"], "data.block_size 512 exceeds the model's context of 256 tokens"),
        (["model.init=pretrained", "model.architecture={}", "model.tokenizer=null",
          "model.name=/nonexistent/model"], "is not a .* transformers can load"),
    ],
)
def test_incompatible_model_fails_before_training(default_assets, overrides, message):
    from raymed.errors import RaymedError
    from raymed.train import check_model_fits

    with pytest.raises(RaymedError, match=message):
        check_model_fits(load_config("ci-tiny", overrides))


def test_scratch_vocabulary_is_padded_to_a_multiple_of_64(default_assets):
    from transformers import AutoTokenizer

    from raymed.assets import resolve_pretrained
    from raymed.train import build_model

    config = load_config("gpt2-pretrain", ["model.architecture={model_type: gpt2, n_layer: 1, n_head: 2, n_embd: 32}"])
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained("gpt2"))
    model = build_model(config.model, tokenizer)
    assert model.get_input_embeddings().num_embeddings == 50304  # 50257 rounded up to 64
