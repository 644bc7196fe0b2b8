"""The chat page at the model's own sampling defaults: the default model as `raymed assets`
converts it (the session's cache, rebuilt whenever the conversion recipe changes, so the
recommended sampling is what this code writes), served for real, asked a medical question
in headless Chromium. The page sends no sampling fields; the answer must be on topic (word
salad at temperature 1.0 was what users got)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve_support import free_port, start_app

from raymed.config import load_config

pytestmark = pytest.mark.slow  # about 30 s on 2 cores: one replica of the default model, 64 tokens

CHROMIUM = "/usr/bin/chromium"
QUESTION = "What are the common symptoms of the flu?"
EXPECTED_TERMS = ("fever", "cough", "sore throat", "headache", "muscle", "fatigue", "chills", "aches", "tired")


@pytest.fixture(scope="module")
def url(ray_cluster, default_assets):
    from ray import serve

    from raymed.serve.app import build_application

    model_dir = default_assets / "models" / "smollm2-135m-instruct"
    assert json.loads((model_dir / "generation_config.json").read_text())["temperature"] == 0.2
    config = load_config(None, [f"serve.model={model_dir}", "serve.num_cpus=1", "serve.default_max_tokens=64"])
    yield start_app(build_application(config), free_port())
    serve.shutdown()


def test_the_chat_page_gets_a_coherent_answer_at_the_models_defaults(url):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make install` installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page()
        sent = []
        page.on("request", lambda request: sent.append(request.post_data_json)
                if request.url.endswith("/v1/chat/completions") else None)
        page.goto(f"{url}/")
        page.get_by_text("Model: ").wait_for()
        page.fill("#prompt", QUESTION)
        page.click("#send")
        page.locator(".assistant[data-done=true]").wait_for(timeout=240_000)
        answer = page.get_by_test_id("answer").inner_text().lower()
        browser.close()
    assert sent and not {"temperature", "top_p"} & set(sent[0])
    assert any(term in answer for term in EXPECTED_TERMS), answer
