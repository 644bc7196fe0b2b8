"""Distillation: the KD loss by hand, the layer-extracted student against a hand-built copy,
refusals, and real Ray Train runs (α = 0 against fine-tuning; half the layers distilled,
gated and promoted into the student's own registry model)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from corpora import signs_corpus
from transformers import AutoConfig, AutoModelForCausalLM

from raymed.config import load_config
from raymed.data.pipeline import build_datasets
from raymed.distill.loss import summed_kd_loss
from raymed.distill.run import distill
from raymed.distill.student import extract_layers, prepare_run
from raymed.errors import RaymedError
from raymed.registry import Registry
from raymed.train import METRICS_FILE, fit, train_dir


def _llama(layers: int, seed: int = 0, vocab: int = 64, **extra):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, architectures=["LlamaForCausalLM"], **extra)
    return AutoModelForCausalLM.from_config(config).eval()


def test_kd_loss_is_the_tempered_kl_over_labelled_positions_only():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, -100, -100]])
    temperature = 2.0
    expected = 0.0
    for row, position in [(0, 1), (0, 2), (1, 0), (1, 1)]:  # position t predicts label t+1
        p = torch.softmax(teacher[row, position] / temperature, -1)
        q = torch.softmax(student[row, position] / temperature, -1)
        expected += temperature ** 2 * float((p * (p.log() - q.log())).sum())
    assert float(summed_kd_loss(student, teacher, labels, temperature, vocab=7)) == pytest.approx(expected, rel=1e-5)
    moved = student.clone()
    moved[0, 3] += 5  # predicts an unlabelled token: not scored
    moved[:, :, 6] += 100  # a padded vocabulary column beyond the tokenizer's ids: not scored
    assert float(summed_kd_loss(moved, teacher, labels, temperature, vocab=6)) == pytest.approx(
        float(summed_kd_loss(student, teacher, labels, temperature, vocab=6)), rel=1e-5)
    assert float(summed_kd_loss(teacher, teacher, labels, temperature, vocab=7)) == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_the_layer_student_equals_a_hand_built_copy(tied):
    teacher = _llama(layers=4, tie_word_embeddings=tied)
    student = extract_layers(teacher, [0, 2]).eval()
    hand = copy.deepcopy(teacher)
    hand.model.layers = torch.nn.ModuleList([hand.model.layers[0], hand.model.layers[2]])
    for index, layer in enumerate(hand.model.layers):
        layer.self_attn.layer_idx = index
    hand.config.num_hidden_layers = 2
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(student(input_ids=ids).logits, hand(input_ids=ids).logits)
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    assert student.lm_head.weight.data_ptr() != teacher.lm_head.weight.data_ptr()  # copied, not shared
    with pytest.raises(RaymedError, match=r"names layer 4, but the teacher has 4 decoder layers \(0-3\)"):
        extract_layers(teacher, [0, 4])


def _teacher_dir(tiny_model, directory: Path) -> Path:
    """A tiny 2-layer Llama teacher (random weights, the default tokenizer's vocabulary), saved."""
    return tiny_model.save(_llama(2, vocab=-(-len(tiny_model.tokenizer) // 64) * 64), directory)


def _trained_teacher_dir(tiny_model, directory: Path, steps: int = 30) -> Path:
    """A 4-layer tiny Llama trained (in this process) on the signs corpus's conversations: a
    teacher that knows the data, so that its distributions and the labels agree."""
    tokenizer = tiny_model.tokenizer
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"What is sign {i}?"},
                                            {"role": "assistant", "content": f"Sign {i} suggests infection."}],
                                           tokenize=False) for i in range(80)]
    teacher = _llama(4, vocab=-(-len(tokenizer) // 64) * 64).train()
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    for step in range(steps):
        batch = tokenizer(texts[(step * 8) % 80:(step * 8) % 80 + 8], return_tensors="pt", padding=True)
        teacher(**batch, labels=batch.input_ids.masked_fill(batch.attention_mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return tiny_model.save(teacher.eval(), directory)


def test_a_student_with_another_tokenizer_is_refused(tiny_model, tmp_path):
    teacher = _teacher_dir(tiny_model, tmp_path / "teacher")
    common = [f"storage_path={tmp_path}", f"distill.teacher={teacher}"]
    with pytest.raises(RaymedError, match=r"the student's tokenizer is not the teacher's .*50257 tokens against "
                                          r"49152.* id .* in the student's but .* in the teacher's"):
        prepare_run(load_config("ci-tiny", [*common, "model.tokenizer=gpt2"]))
    with pytest.raises(RaymedError, match="model.add_tokens adds tokens the teacher has no distribution over"):
        prepare_run(load_config("ci-tiny", [*common, "model.add_tokens=['<dx>']"]))
    with pytest.raises(RaymedError, match=r"names layer 2, but the teacher has 2 decoder layers \(0-1\)"):
        prepare_run(load_config("ci-tiny", [*common, "distill.student_layers=[0,2]"]))
    for bad, message in [("distill.alpha=1.5", "distill.alpha: Input should be less than or equal to 1"),
                         ("distill.temperature=0", "distill.temperature: Input should be greater than 0"),
                         ("distill.student_layers=[]", "distill.student_layers: give increasing")]:
        with pytest.raises(RaymedError, match=message):
            load_config("ci-tiny", [bad])
    # The same tokenizer passes, and the run trains the model section into the student's own registry.
    prepared = prepare_run(load_config("ci-tiny", common))
    assert (prepared.distill.teacher, prepared.registry.name) == (str(teacher.resolve()), "medical-assistant-small")
    assert prepared.run_name == "ci-tiny-distill"  # its own run directory, apart from the fine-tune's


def _run_args(tmp_path: Path, corpus: Path, name: str) -> list[str]:
    return [f"data.train_path={corpus}", "data.block_size=64", "data.val_fraction=0.1", "data.deterministic=true",
            f"storage_path={tmp_path / name}", f"run_name={name}", "train.warmup_steps=1", "train.eval_every=4",
            "train.max_steps=4"]


def _logged(config) -> list[dict]:
    return [json.loads(line) for line in (train_dir(config) / "logs" / METRICS_FILE).read_text().splitlines()]


@pytest.mark.slow
def test_alpha_zero_matches_fine_tuning_and_an_equal_teacher_starts_at_zero_kd(ray_cluster, tiny_model, tmp_path):
    """The student is the teacher itself (the model section names the teacher's directory):
    its KL to the teacher is 0 at the first step; with α = 0 every step's loss is fine-tuning's."""
    teacher = _teacher_dir(tiny_model, tmp_path / "teacher")
    corpus = signs_corpus(tmp_path)
    model = ["model.init=pretrained", "model.architecture={}", "model.tokenizer=null", f"model.name={teacher}"]
    plain = load_config("ci-tiny", [*_run_args(tmp_path, corpus, "plain"), *model])
    assert fit(plain, build_datasets(plain)[0]).error is None
    # The same run_name and storage: the distillation must start afresh, not resume the fine-tune.
    distilled = load_config("ci-tiny", [*_run_args(tmp_path, corpus, "plain"), *model,
                                        f"distill.teacher={teacher}", "distill.alpha=0"])
    done = distill(distilled, promote=False)
    assert done.result.error is None and done.promotion is None
    assert train_dir(done.config) == tmp_path / "plain" / "runs" / "plain-distill" / "train"
    fine_tuned, steps = _logged(plain), _logged(done.config)
    assert [s["step"] for s in steps] == [s["step"] for s in fine_tuned] == [1, 2, 3, 4]
    assert [s["train_loss"] for s in steps] == pytest.approx([s["train_loss"] for s in fine_tuned], abs=1e-5)
    assert [s["ce_loss"] for s in steps] == pytest.approx([s["train_loss"] for s in steps], abs=1e-6)
    assert steps[0]["kd_loss"] == pytest.approx(0, abs=1e-5)
    assert steps[-1]["kd_loss"] > 1e-4  # CE alone moved the student off its teacher
    assert all(s["tokens_per_s"] > 0 for s in steps)


@pytest.mark.slow
def test_half_the_layers_distilled_under_fsdp_lower_kd_and_promote_a_loadable_student(ray_cluster, tiny_model,
                                                                                       tmp_path):
    teacher = _trained_teacher_dir(tiny_model, tmp_path / "teacher")
    config = load_config("ci-tiny", [*_run_args(tmp_path, signs_corpus(tmp_path), "half"), "train.max_steps=8",
                                     "model.init=pretrained", "model.architecture={}", "model.tokenizer=null",
                                     f"distill.teacher={teacher}", "distill.student_layers=[0,2]",
                                     "distill.alpha=0.5", "train.strategy=fsdp", "train.lr=3e-3",
                                     "eval.max_items=8", "eval.bootstrap_samples=200"])
    done = distill(config)
    assert done.result.error is None and done.result.metrics["step"] == 8
    steps = _logged(done.config)
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert steps[-1]["kd_loss"] < 0.5 * steps[0]["kd_loss"]
    for s in steps:
        mixed = 0.5 * s["ce_loss"] + 0.5 * s["kd_loss"]
        assert s["train_loss"] == pytest.approx(mixed, rel=1e-5) and math.isfinite(s["tokens_per_s"])

    checkpoint = Path(done.result.checkpoint.path)
    student = AutoModelForCausalLM.from_pretrained(checkpoint)  # loads as it is
    assert student.config.num_hidden_layers == 2
    registry = Registry.for_config(done.config)
    assert registry.name == "medical-assistant-small" and registry.versions()[0] == "v1"
    assert registry.manifest("v1")["base_model"] == str(tmp_path / "half" / "runs" / "half-distill" / "student")
    assert done.promotion.previous == "v1" and "val_loss" in done.promotion.reason
    assert not (Path(done.config.storage_path) / "registry" / "medical-assistant").exists()  # the teacher's: untouched
