// The chat page: settings, the conversation, and one streamed /v1/chat/completions per turn.

import { renderMarkdown } from "./markdown.js";
import { sseData } from "./sse.js";

const KEY_STORAGE = "llmserve.apiKey";
const SETTINGS_STORAGE = "llmserve.settings";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"),
  newChat: $("new-chat"),
  toggleSettings: $("toggle-settings"),
  settings: $("settings"),
  systemPrompt: $("system-prompt"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  apiKey: $("api-key"),
  status: $("status"),
  messages: $("messages"),
  empty: $("empty"),
  composer: $("composer"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
};

// Only finished exchanges (a user turn and a non-empty reply) enter the history the model sees;
// a failed turn stays on screen, marked, but is not sent again.
const state = { history: [], controller: null, savedModel: "", modelsCall: 0 };

class ServerError extends Error {}

// ---- settings -----------------------------------------------------------------------------

function storageGet(key) {
  try {
    return localStorage.getItem(key);
  } catch {
    return null; // storage disabled (a privacy mode): the page still works, it just forgets
  }
}

function storageSet(key, value) {
  try {
    localStorage.setItem(key, value);
  } catch {
    // as above: nothing to keep it in
  }
}

function loadSettings() {
  ui.apiKey.value = storageGet(KEY_STORAGE) ?? "";
  let saved = {};
  try {
    saved = JSON.parse(storageGet(SETTINGS_STORAGE) ?? "{}") ?? {};
  } catch {
    saved = {}; // written by an older page: start from the defaults
  }
  if (typeof saved.system === "string") ui.systemPrompt.value = saved.system;
  if (typeof saved.temperature === "string") ui.temperature.value = saved.temperature;
  if (typeof saved.maxTokens === "string") ui.maxTokens.value = saved.maxTokens;
  if (typeof saved.model === "string") state.savedModel = saved.model;
}

function saveSettings() {
  const settings = {
    system: ui.systemPrompt.value,
    temperature: ui.temperature.value,
    maxTokens: ui.maxTokens.value,
    model: ui.model.value || state.savedModel,
  };
  storageSet(SETTINGS_STORAGE, JSON.stringify(settings));
}

function authHeaders() {
  const key = ui.apiKey.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function setStatus(text, kind) {
  ui.status.textContent = text;
  ui.status.className = `status status-${kind}`;
}

async function errorFrom(response) {
  let message = `The server answered ${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    if (typeof body?.error?.message === "string") message = body.error.message;
  } catch {
    // not an OpenAI error object (a proxy's page): the status line is all there is
  }
  if (response.status === 401) message += " Set the API key in Settings.";
  return new ServerError(message);
}

async function loadModels() {
  // A key typed while the previous call is in flight: only the latest call may set the status.
  const call = ++state.modelsCall;
  setStatus("Connecting…", "busy");
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) throw await errorFrom(response);
    const { data } = await response.json();
    if (call !== state.modelsCall) return;
    const wanted = ui.model.value || state.savedModel;
    ui.model.replaceChildren(
      ...data.map((card) => {
        const option = document.createElement("option");
        option.value = card.id;
        option.textContent = card.id;
        return option;
      }),
    );
    if (data.some((card) => card.id === wanted)) ui.model.value = wanted;
    const card = data.find((c) => c.id === ui.model.value);
    setStatus(card ? `Connected: ${card.id}, context ${card.max_model_len} tokens.` : "No models served.", "ok");
  } catch (error) {
    if (call === state.modelsCall) setStatus(`Could not list models: ${error.message}`, "error");
  }
}

// ---- the conversation view ------------------------------------------------------------------

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function nearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 48;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function addMessage(role, label) {
  ui.empty.hidden = true;
  const article = element("article", `message ${role}`);
  const content = element("div", "content");
  article.append(element("div", "who", label), content);
  ui.messages.append(article);
  scrollToBottom();
  return { article, content };
}

// Re-renders the reply at most once a frame: a token at a time would re-parse the whole reply
// per token, and the eye cannot tell the difference.
function replyView(view) {
  let text = "";
  let queued = false;
  const render = () => {
    queued = false;
    const follow = nearBottom();
    view.content.replaceChildren(renderMarkdown(text));
    if (follow) scrollToBottom();
  };
  return {
    get text() {
      return text;
    },
    append(piece) {
      text += piece;
      if (!queued) {
        queued = true;
        requestAnimationFrame(render);
      }
    },
    flush: render,
  };
}

function formatSeconds(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function showMeta(view, timing) {
  const meta = element("div", "meta");
  const items = [];
  if (timing.firstAt !== null) {
    const ttft = element("span", "ttft", `TTFT ${formatSeconds(timing.firstAt - timing.startAt)}`);
    ttft.title = "Time to first token: from sending the request to the first text arriving.";
    items.push(ttft);
  }
  const approx = timing.usage ? "" : "≈";
  const tokens = timing.usage ? timing.usage.completion_tokens : timing.chunks;
  // Decode speed: the tokens after the first over the time after the first, so the prompt's
  // prefill (already in TTFT) does not drag the rate down.
  const decodeMs = timing.endAt - (timing.firstAt ?? timing.endAt);
  if (tokens > 1 && decodeMs > 0) {
    const rate = element("span", "rate", `${approx}${((tokens - 1) / (decodeMs / 1000)).toFixed(1)} tok/s`);
    rate.title = "Decode speed: tokens after the first, divided by the time after the first.";
    items.push(rate);
  }
  items.push(element("span", "tokens", `${approx}${tokens} token${tokens === 1 ? "" : "s"}`));
  if (timing.finish === "length") items.push(element("span", "finish", "hit max tokens"));
  if (timing.stopped) items.push(element("span", "finish stopped", "stopped"));
  meta.append(...items);
  view.article.append(meta);
}

function showError(view, message, note) {
  const box = element("div", "error");
  box.setAttribute("role", "alert");
  box.append(element("strong", "", "Error: "), document.createTextNode(message));
  if (note) box.append(element("div", "error-note", note));
  view.article.append(box);
}

function setBusy(busy) {
  ui.send.disabled = busy || ui.input.value.trim() === "";
  ui.stop.hidden = !busy;
  ui.composer.classList.toggle("busy", busy);
}

// ---- one turn -------------------------------------------------------------------------------

function requestBody(messages) {
  const body = {
    model: ui.model.value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  // Left out when empty: the server's defaults (temperature 1, up to the context window) apply.
  if (ui.temperature.value !== "") body.temperature = Number(ui.temperature.value);
  if (ui.maxTokens.value !== "") body.max_tokens = Number(ui.maxTokens.value);
  return body;
}

async function streamReply(body, reply, timing, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await errorFrom(response);
  for await (const data of sseData(response)) {
    if (data === "[DONE]") break;
    const event = JSON.parse(data);
    if (event.error) throw new ServerError(event.error.message ?? "The server reported an error.");
    if (event.usage) timing.usage = event.usage;
    for (const choice of event.choices ?? []) {
      const piece = choice.delta?.content;
      if (piece) {
        timing.firstAt ??= performance.now();
        timing.chunks += 1;
        reply.append(piece);
      }
      if (choice.finish_reason) timing.finish = choice.finish_reason;
    }
  }
}

async function send(text) {
  const userTurn = { role: "user", content: text };
  const system = ui.systemPrompt.value.trim();
  // "New chat" during this turn swaps in a fresh array, so this turn lands in the old one.
  const history = state.history;
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...history, userTurn];
  const userView = addMessage("user", "You");
  userView.content.textContent = text; // what the user typed, as typed: no Markdown
  const view = addMessage("assistant", ui.model.value || "Assistant");
  view.article.classList.add("streaming");
  const reply = replyView(view);
  const timing = { startAt: performance.now(), firstAt: null, endAt: 0, chunks: 0, usage: null, finish: null };
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  try {
    await streamReply(requestBody(messages), reply, timing, controller.signal);
    history.push(userTurn, { role: "assistant", content: reply.text });
  } catch (error) {
    if (error.name === "AbortError") {
      timing.stopped = true;
      if (reply.text) history.push(userTurn, { role: "assistant", content: reply.text });
    } else {
      const message = error instanceof ServerError ? error.message : `Could not reach the server (${error.message}).`;
      showError(view, message, "This message is not part of the conversation; edit and send it again.");
      userView.article.classList.add("unsent");
      if (ui.input.value.trim() === "") ui.input.value = text;
    }
  } finally {
    timing.endAt = performance.now();
    state.controller = null;
    reply.flush();
    view.article.classList.remove("streaming");
    if (timing.stopped && !reply.text) view.content.append(element("p", "muted", "Stopped before any text arrived."));
    if (timing.firstAt !== null || timing.stopped) showMeta(view, timing);
    setBusy(false);
    autoGrow();
    ui.input.focus();
  }
}

// ---- wiring ---------------------------------------------------------------------------------

function autoGrow() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 220)}px`;
  if (!state.controller) ui.send.disabled = ui.input.value.trim() === "";
}

function newChat() {
  state.controller?.abort();
  state.history = [];
  ui.messages.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  ui.input.focus();
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.input.value.trim();
  if (!text || state.controller) return;
  ui.input.value = "";
  autoGrow();
  send(text);
});

ui.input.addEventListener("keydown", (event) => {
  // isComposing: Enter that confirms an IME candidate (Japanese, Chinese, ...) is not "send".
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});

ui.input.addEventListener("input", autoGrow);
ui.stop.addEventListener("click", () => state.controller?.abort());
ui.newChat.addEventListener("click", newChat);

function toggleSettings(open) {
  ui.settings.classList.toggle("open", open);
  ui.toggleSettings.setAttribute("aria-expanded", String(open));
}

ui.toggleSettings.addEventListener("click", () => toggleSettings(!ui.settings.classList.contains("open")));
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && ui.settings.classList.contains("open")) toggleSettings(false);
});

for (const field of [ui.systemPrompt, ui.temperature, ui.maxTokens, ui.model]) {
  field.addEventListener("change", saveSettings);
}

ui.apiKey.addEventListener("change", () => {
  storageSet(KEY_STORAGE, ui.apiKey.value.trim());
  loadModels();
});

ui.messages.addEventListener("click", async (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const code = button.closest(".code-block")?.querySelector("code");
  try {
    await navigator.clipboard.writeText(code?.textContent ?? "");
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";
  }
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
});

// The clipboard API exists only in secure contexts (https, localhost): elsewhere, no copy buttons.
document.body.classList.toggle("no-clipboard", !navigator.clipboard);
loadSettings();
autoGrow();
loadModels();
ui.input.focus();
