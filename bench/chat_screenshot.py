"""Screenshot of the chat page for the README: serve a model on a local Ray, open the page in
headless Chromium (Debian's /usr/bin/chromium through Playwright), ask one question, wait for
the whole answer, save a PNG.

    python bench/chat_screenshot.py                       # the default model → docs/chat-page.png
    python bench/chat_screenshot.py --model DIR --out x.png --question "What is a fever?"

Prints one JSON line (the question, the answer's length, seconds, the file and its size)."""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_model(model: str, max_tokens: int) -> str:
    """Start a local Ray and the raymed Serve app on a free port; return the page's URL."""
    import ray
    from ray import serve

    from raymed.config import load_config
    from raymed.serve.app import build_application

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = load_config(None, [f"serve.model={model}", "serve.num_cpus=1", "serve.max_replicas=1",
                                f"serve.default_max_tokens={max_tokens}"])
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(config), name="raymed", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the app at {url} did not become healthy")


def screenshot(url: str, question: str, out: Path) -> dict:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 900, "height": 640})
        page.goto(f"{url}/")
        page.get_by_text("Model: ").wait_for()
        page.fill("#prompt", question)
        page.click("#send")
        page.locator(".assistant[data-done=true]").wait_for(timeout=600_000)
        answer = page.get_by_test_id("answer").inner_text()
        citations = page.get_by_test_id("citation").count()
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    return {"answer_chars": len(answer), "citations": citations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="serve.model: a cached model name, a model directory or current")
    parser.add_argument("--question", default="What does the ICD-10-CM code E11.9 mean?")
    parser.add_argument("--max-tokens", type=int, default=96, help="serve.default_max_tokens")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "chat-page.png")
    args = parser.parse_args()
    started = time.monotonic()
    url = serve_model(args.model, args.max_tokens)
    result = screenshot(url, args.question, args.out)
    from ray import serve

    serve.shutdown()
    print(json.dumps({"question": args.question, **result, "seconds": round(time.monotonic() - started, 1),
                      "out": str(args.out), "bytes": args.out.stat().st_size}))


if __name__ == "__main__":
    main()
