"""The serve config section, the shipped Serve YAML and model resolution (no Ray)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

from raymed.cli import main
from raymed.config import dump_yaml, load_config
from raymed.errors import RaymedError

SERVE_YAML = Path(__file__).resolve().parent.parent / "serve" / "config.yaml"


def test_the_shipped_serve_yaml_builds_a_valid_config():
    from raymed.serve.app import AppArgs

    spec = yaml.safe_load(SERVE_YAML.read_text())
    (app,) = spec["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    args = AppArgs.model_validate(app["args"])
    config = load_config(args.config, args.set)
    assert config.serve.max_replicas == 2
    assert spec["http_options"]["port"] == config.serve.port


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("serve.min_replicas=3", "min_replicas (3) must be <= max_replicas (1)"),
        ("serve.max_queued_requests=0", "max_queued_requests must be -1 (no limit) or at least 1"),
        ("serve.overload_status=500", "serve.overload_status: Input should be 503 or 429 (got 500)"),
        ("serve.replicas=2", "serve.replicas: unknown field (got 2)"),
        ("serve.port=70000", "serve.port: Input should be less than or equal to 65535 (got 70000)"),
        ("serve.max_batch_size=0", "serve.max_batch_size: Input should be greater than or equal to 1 (got 0)"),
        ("serve.gateway_replicas=0", "serve.gateway_replicas: Input should be greater than or equal to 1 (got 0)"),
        ("serve.autoscale_look_back_s=5",
         "serve.autoscale_look_back_s: Input should be greater than 10 (got 5)"),
        ("serve.max_num_batched_tokens=16", "max_num_batched_tokens (16) must be more than max_batch_size (16)"),
    ],
)
def test_bad_serve_values_name_the_field(override, expected):
    with pytest.raises(RaymedError, match=None) as err:
        load_config(None, [override])
    assert expected in str(err.value)


def test_the_api_key_prints_masked_and_the_environment_wins(monkeypatch):
    from raymed.serve.app import api_key

    config = load_config(None, ["serve.api_key=s3cret"])
    assert "s3cret" not in dump_yaml(config)
    monkeypatch.delenv("RAYMED_API_KEY", raising=False)
    assert api_key(config) == "s3cret"
    assert api_key(load_config(None)) is None
    monkeypatch.setenv("RAYMED_API_KEY", "from-env")
    assert api_key(config) == "from-env"


def test_a_directory_without_a_model_is_refused_clearly(tmp_path, capsys):
    from raymed.serve.model_source import served_model

    with pytest.raises(RaymedError, match="not a Hugging Face model directory"):
        served_model(load_config(None, [f"serve.model={tmp_path}"]))
    assert main(["serve", "--set", f"serve.model={tmp_path / 'missing'}"]) == 1
    assert "not a Hugging Face model directory" in capsys.readouterr().err


def test_auto_dtype_is_bfloat16_where_the_hardware_multiplies_it_natively(tmp_path, tiny_model):
    import torch

    from raymed.serve.model_source import cpu_has_native_bfloat16, load_for_inference, serving_dtype

    model_dir = str(tiny_model.save(tiny_model(0), tmp_path / "model"))
    cpu_auto = torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    auto_model, _ = load_for_inference(model_dir, load_config(None, []).serve)
    assert next(auto_model.parameters()).dtype == cpu_auto
    assert serving_dtype("auto", on_gpu=True) == torch.bfloat16
    pinned, _ = load_for_inference(model_dir, load_config(None, ["serve.dtype=float32"]).serve)
    assert next(pinned.parameters()).dtype == torch.float32


def test_a_model_directory_is_served_under_its_name_with_its_context(tmp_path):
    from raymed.serve.model_source import served_model

    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512}))
    served = served_model(load_config(None, [f"serve.model={model_dir}"]))
    assert (served.name, served.context_length, served.directory) == ("my-model", 512, str(model_dir))
    renamed = served_model(load_config(None, [f"serve.model={model_dir}", "serve.model_name=medic"]))
    assert renamed.name == "medic"


def test_the_registry_current_version_is_resolved_once_and_pinned(tmp_path, tiny_model):
    from raymed.registry import Registry
    from raymed.serve.model_source import served_model

    base = tiny_model.save(tiny_model(0), tmp_path / "base")
    config = load_config(None, [f"storage_path={tmp_path}", f"model.name={base}"])
    served = served_model(config)  # the registry is empty: the base model becomes v1
    registry = Registry.for_config(config)
    assert (served.name, served.version) == ("medical-assistant", "v1") and registry.current() == "v1"
    assert served.directory == str(registry.path("v1")) and served.context_length == 256

    newer = tiny_model.save(tiny_model(1), tmp_path / "newer")
    registry.add(newer, {"metrics": {}, "source": {"checkpoint": str(newer)}}, expect_current="v1")
    assert served.directory == str(registry.path("v1"))  # what was deployed stays pinned
    assert served_model(config).version == "v2"  # the next deploy serves the new version
