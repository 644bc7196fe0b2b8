// The raymed chat page: streams answers from /v1/chat/completions (SSE), shows the safety
// banner and disclaimer the server attaches, asks for the API key when the server wants one.
"use strict";

const KEY_STORAGE = "raymed-api-key";
const state = { model: null, history: [], key: sessionStorage.getItem(KEY_STORAGE) || "" };
const $ = (id) => document.getElementById(id);

function authHeaders() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

function addTurn(role, text) {
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  turn.dataset.testid = `${role}-turn`;
  turn.textContent = text;
  $("conversation").appendChild(turn);
  return turn;
}

// What a person should read for each way a request can fail.
function explain(status, error, retryAfter) {
  const wait = retryAfter ? ` Please try again in ${retryAfter} second${retryAfter === "1" ? "" : "s"}.` : " Please try again shortly.";
  if (status === 401) return "This server needs an API key, or the key given is not right. Enter the key above and send again.";
  if (status === 429 || status === 503) return "The assistant is busy with other people's questions right now." + wait;
  if (status === 504) return "The answer took too long and was stopped. Try a shorter question.";
  if (status === 413) return "Your message is too long. Please shorten it.";
  if (status === 400) return `The question could not be sent: ${error?.message || "the request was not accepted"}.`;
  if (status === 0) return "Cannot reach the raymed server. Check that it is running and try again.";
  return `Something went wrong on the server (status ${status}). Please try again.`;
}

function showError(status, error, retryAfter) {
  const turn = addTurn("assistant", explain(status, error, retryAfter));
  turn.classList.add("error");
  turn.dataset.testid = "error";
  turn.dataset.status = String(status);
  if (status === 401) askForKey();
}

function askForKey() {
  $("key-form").hidden = false;
  $("key-input").focus();
}

async function errorOf(response) {
  try { return (await response.json()).error; } catch { return null; }
}

// Learns the model's name; returns null, or the failure ({status, error, retryAfter}) after saying so.
async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: authHeaders() });
  } catch {
    return failedToLoad({ status: 0 });
  }
  if (!response.ok) {
    return failedToLoad({ status: response.status, error: await errorOf(response),
                          retryAfter: response.headers.get("Retry-After") });
  }
  state.model = (await response.json()).data[0].id;
  $("key-form").hidden = true;
  $("status").textContent = `Model: ${state.model}`;
  return null;
}

function failedToLoad(failure) {
  $("status").textContent = failure.status === 401 ? "This server needs an API key." : explain(failure.status, failure.error, failure.retryAfter);
  if (failure.status === 401) askForKey();
  return failure;
}

// An answer being streamed: the banner (from the `safety` object), the text, the disclaimer.
class AnswerView {
  constructor() {
    this.turn = addTurn("assistant", "");
    this.banner = document.createElement("div");
    this.banner.className = "banner";
    this.banner.dataset.testid = "safety-banner";
    this.banner.setAttribute("role", "alert");
    this.banner.hidden = true;
    this.text = document.createElement("div");
    this.text.dataset.testid = "answer";
    this.disclaimer = document.createElement("div");
    this.disclaimer.className = "disclaimer";
    this.disclaimer.dataset.testid = "disclaimer";
    this.sources = document.createElement("ol");  // the citations (grounded answers)
    this.sources.className = "sources";
    this.sources.dataset.testid = "citations";
    this.sources.hidden = true;
    this.turn.append(this.banner, this.text, this.sources, this.disclaimer);
    this.raw = "";
    this.bannerText = "";
    this.deltas = 0;
  }

  mark(safety) {
    if (!safety) return;
    this.disclaimer.textContent = safety.disclaimer;
    if (safety.red_flag) {
      this.bannerText = safety.banner;
      this.banner.textContent = safety.banner.trim();
      this.banner.hidden = false;
    }
  }

  // Citations come on the first and the last chunk; shown once, under the answer (text only, never HTML).
  cite(citations) {
    this.sources.replaceChildren(...citations.map((c) => {
      const item = document.createElement("li");
      item.dataset.testid = "citation";
      item.dataset.id = c.id;
      item.textContent = `${c.source}: ${c.title}`;
      item.title = c.text;
      return item;
    }));
    this.sources.hidden = citations.length === 0;
  }

  append(content) {
    this.raw += content;
    this.deltas += 1;
    this.text.dataset.deltas = String(this.deltas);
    // The banner's text also leads the answer (for plain API clients); shown once, on top.
    const body = this.bannerText && this.raw.startsWith(this.bannerText) ? this.raw.slice(this.bannerText.length) : this.raw;
    this.text.textContent = body;
  }

  finish() {
    this.turn.dataset.done = "true";
  }
}

async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function ask(question) {
  addTurn("user", question);
  state.history.push({ role: "user", content: question });
  let response;
  try {
    response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ model: state.model, messages: state.history, stream: true }),  // length: the server's default
    });
  } catch {
    state.history.pop();
    showError(0);
    return;
  }
  if (!response.ok) {
    state.history.pop();
    showError(response.status, await errorOf(response), response.headers.get("Retry-After"));
    return;
  }
  const view = new AnswerView();
  for await (const chunk of sseEvents(response)) {
    if (chunk.error) {
      showError(chunk.error.code === "timeout" ? 504 : 500, chunk.error);
      break;
    }
    if (chunk.safety) view.mark(chunk.safety);
    if (chunk.citations) view.cite(chunk.citations);
    const content = chunk.choices?.[0]?.delta?.content;
    if (content) view.append(content);
  }
  view.finish();
  state.history.push({ role: "assistant", content: view.raw });
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.key = $("key-input").value.trim();
  sessionStorage.setItem(KEY_STORAGE, state.key);
  $("key-input").value = "";
  await loadModel();
});

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = $("prompt").value.trim();
  if (!question) return;
  const failure = state.model ? null : await loadModel();
  if (failure) {
    showError(failure.status, failure.error, failure.retryAfter);
    return;
  }
  $("send").disabled = true;
  $("prompt").value = "";
  try {
    await ask(question);
  } finally {
    $("send").disabled = false;
    $("prompt").focus();
  }
});

loadModel();
