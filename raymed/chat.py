"""`raymed chat`: a terminal client for the Serve endpoint.

Streams each answer as it is generated (SSE from `/v1/chat/completions`), prints the
safety banner the server attaches to a red-flag question above the answer and the
disclaimer under it, keeps the conversation, and turns HTTP errors into sentences.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

import requests

from raymed.errors import RaymedError

RED, DIM, RESET = "\033[1;31m", "\033[2m", "\033[0m"


def explain(status: int, error: dict | None, retry_after: str | None) -> str:
    """What a person should read for a failed request (the same wording as the chat page)."""
    if status == 401:
        return "the server needs an API key, or the key given is wrong: pass --api-key or set RAYMED_API_KEY"
    if status in (429, 503):
        wait = f"in {retry_after} s" if retry_after else "shortly"
        return f"the assistant is busy with other requests right now; try again {wait}"
    if status == 504:
        return "the answer took too long and was stopped; try a shorter question"
    message = (error or {}).get("message", "")
    if status in (400, 404, 413):
        return f"the question was not accepted: {message}"
    return f"the server failed (status {status}): {message}"


@dataclass
class Answer:
    text: str = ""
    safety: dict = field(default_factory=dict)
    citations: list[dict] = field(default_factory=list)
    """The knowledge-index passages the answer was grounded in (the stream's last chunk has them)."""
    grounding_warning: str | None = None


@dataclass
class ChatClient:
    url: str
    """The API base URL (`http://host:8000/v1`)."""
    api_key: str | None = None
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    """None: the served model's default (its generation_config.json; `/v1/models` shows it)."""
    timeout_s: float = 300
    history: list[dict] = field(default_factory=list)

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _request(self, method: str, route: str, **kwargs) -> requests.Response:
        try:
            response = requests.request(method, f"{self.url.rstrip('/')}{route}", headers=self._headers(),
                                        timeout=self.timeout_s, **kwargs)
        except requests.ConnectionError:
            raise RaymedError(f"cannot reach the raymed server at {self.url}: is `raymed serve` running?") from None
        if response.status_code != 200:
            try:
                error = response.json().get("error")
            except ValueError:
                error = None
            raise RaymedError(explain(response.status_code, error, response.headers.get("Retry-After")))
        return response

    def served_model(self) -> str:
        """The model name the server serves (asked once)."""
        if self.model is None:
            self.model = self._request("GET", "/models").json()["data"][0]["id"]
        return self.model

    def ask(self, question: str, out: TextIO) -> Answer:
        """Stream the answer to `question` into `out`; banner first, disclaimer last."""
        messages = [*self.history, {"role": "user", "content": question}]
        body = {"model": self.served_model(), "messages": messages, "stream": True}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        if self.temperature is not None:
            body["temperature"] = self.temperature
        answer = Answer()
        with self._request("POST", "/chat/completions", json=body, stream=True) as response:
            for chunk in _sse_payloads(response):
                if "error" in chunk:
                    raise RaymedError(explain(504 if chunk["error"].get("code") == "timeout" else 500,
                                              chunk["error"], None))
                self._show(chunk, answer, out)
        out.write(sources_text(answer))
        out.write(f"\n{DIM}{answer.safety.get('disclaimer', '')}{RESET}\n")
        out.flush()
        self.history = [*messages, {"role": "assistant", "content": answer.text}]
        return answer

    @staticmethod
    def _show(chunk: dict, answer: Answer, out: TextIO) -> None:
        answer.citations = chunk.get("citations", answer.citations)
        answer.grounding_warning = chunk.get("grounding_warning", answer.grounding_warning)
        if "safety" in chunk and not answer.safety:
            answer.safety = chunk["safety"]
            if answer.safety["red_flag"]:
                out.write(f"{RED}{answer.safety['banner'].strip()}{RESET}\n\n")
        content = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content") or ""
        banner = answer.safety.get("banner") or ""
        if not answer.text and banner and content.startswith(banner):
            content = content[len(banner):]  # already shown, in red, above
        answer.text += content
        out.write(content)
        out.flush()


def sources_text(answer: Answer) -> str:
    """The citations under an answer, one numbered line each (and why there are none, if the server said)."""
    lines = [f"[{n}] {c['source']}: {c['title']}" for n, c in enumerate(answer.citations, 1)]
    if answer.grounding_warning:
        lines.append(f"(not grounded: {answer.grounding_warning})")
    return "\n\nSources:\n" + "\n".join(lines) + "\n" if lines else ""


def _sse_payloads(response: requests.Response) -> Iterator[dict]:
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return
        yield json.loads(data)


def run_chat(client: ChatClient, messages: list[str], out: TextIO = sys.stdout, prompt_in: TextIO = sys.stdin) -> int:
    """Ask each of `messages` in turn; with none, a conversation on `prompt_in` until EOF or `/quit`."""
    out.write(f"raymed chat: {client.served_model()} at {client.url}\n")
    if messages:
        for question in messages:
            out.write("assistant> ")
            client.ask(question, out)
        return 0
    for question in _typed_questions(prompt_in, out):
        out.write("assistant> ")
        try:
            client.ask(question, out)
        except RaymedError as err:  # say what went wrong and keep the conversation going
            out.write(f"\n[{err}]\n")
    return 0


def _typed_questions(prompt_in: TextIO, out: TextIO) -> Iterator[str]:
    out.write("Type a question (Ctrl-D or /quit to leave).\n")
    while True:
        out.write("you> ")
        out.flush()
        line = prompt_in.readline()
        if not line or line.strip() == "/quit":
            return
        if line.strip():
            yield line.strip()
