import pytest

from raymed.config import Config, dump_yaml, load_config, preset_names, with_values
from raymed.errors import RaymedError


@pytest.mark.parametrize("name", ["cpu-demo", "gpu", "gpt2-pretrain", "ci-tiny"])
def test_every_preset_design_names_loads(name):
    assert name in preset_names()
    config = load_config(name)
    assert config.run_name == name


def test_every_shipped_yaml_validates():
    for name in preset_names():
        assert isinstance(load_config(name), Config)


def test_overrides_are_parsed_as_yaml_values():
    config = load_config("ci-tiny", ["train.lr=3e-4", "data.block_size=64", "train.use_gpu=true",
                                     "train.bf16=true", "run_name=my-run"])
    assert config.train.lr == 3e-4
    assert config.data.block_size == 64
    assert config.train.bf16 is True
    assert config.run_name == "my-run"


def test_config_round_trips_through_yaml_and_plain_data(tmp_path):
    config = load_config("gpt2-pretrain", ["seed=7"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(config))
    assert load_config(path) == config
    assert Config.model_validate(config.model_dump()) == config  # as Ray workers rebuild it


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=-1", "train.lr: Input should be greater than 0 (got -1)"),
        ("train.lr=fast", "train.lr: Input should be a valid number"),
        ("train.lerning_rate=1e-3", "train.lerning_rate: unknown field (got '1e-3')"),
        ("data.on_bad_row=ignore", "data.on_bad_row: Input should be 'skip' or 'fail' (got 'ignore')"),
        ("train.warmup_steps=99", "warmup_steps (99) must be < max_steps (12)"),
        ("train.bf16=true", "bf16 and compile need use_gpu: true"),
        ("train.scope=top_layers", "scope: top_layers and train.top_layers go together"),
        ("train.strategy=zero3", "train.strategy: Input should be 'ddp' or 'fsdp' (got 'zero3')"),
        ("train.cpu_offload=true", "train.cpu_offload needs train.strategy: fsdp (it is ddp)"),
        ("train.fsdp_reshard_after_forward=false", "train.fsdp_reshard_after_forward needs train.strategy: fsdp"),
        ("model.init=pretrained", "architecture is only used with init: scratch"),
        ("run_name=../escape", "run_name: String should match pattern"),
    ],
)
def test_bad_values_name_the_field_and_value(override, expected):
    with pytest.raises(RaymedError) as err:
        load_config("ci-tiny", [override])
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_fsdp_options_are_checked_against_each_other():
    config = load_config("ci-tiny", ["train.strategy=fsdp", "train.fsdp_reshard_after_forward=false",
                                     "train.activation_checkpointing=true"])
    assert not config.train.reshard_after_forward
    assert load_config("ci-tiny", ["train.strategy=fsdp", "train.num_workers=1"]).train.reshard_after_forward
    with pytest.raises(RaymedError, match="train.cpu_offload moves sharded state off the GPU: it needs train.use_gpu"):
        load_config("ci-tiny", ["train.strategy=fsdp", "train.cpu_offload=true"])
    load_config("ci-tiny", ["train.strategy=fsdp", "train.cpu_offload=true", "train.use_gpu=true"])


def test_tune_and_plain_data_carry_the_strategy_unchanged():
    config = load_config("ci-tiny", ["train.strategy=fsdp"])
    assert Config.model_validate(config.model_dump()).train.strategy == "fsdp"  # as workers and trials rebuild it
    assert with_values(load_config("ci-tiny"), {"train.strategy": "fsdp"}).train.strategy == "fsdp"
    load_config("ci-tiny", ["tune.space={train.strategy: {choice: [ddp, fsdp]}}"])  # a searchable field


def test_scratch_model_needs_architecture_and_tokenizer():
    with pytest.raises(RaymedError, match="needs architecture.model_type"):
        load_config(None, ["model.init=scratch", "model.tokenizer=gpt2"])
    with pytest.raises(RaymedError, match="needs a tokenizer"):
        load_config(None, ["model.init=scratch", "model.architecture={model_type: gpt2}"])


@pytest.mark.parametrize("override", ["noequals", "=3", "train.lr.x=1"])
def test_malformed_overrides_are_rejected(override):
    with pytest.raises(RaymedError):
        load_config("ci-tiny", [override])


def test_unknown_preset_lists_the_presets():
    with pytest.raises(RaymedError, match="cpu-demo, gpt2-pretrain, gpu"):
        load_config("no-such-preset")


def test_non_mapping_yaml_is_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(RaymedError, match="must be a YAML mapping"):
        load_config(path)
    path.write_text("train: {lr: [1,\n")
    with pytest.raises(RaymedError, match="not valid YAML"):
        load_config(path)
