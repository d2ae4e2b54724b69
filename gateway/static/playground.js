// The playground: conversations that stream over one WebSocket (/ws/generate, see gateway/ws.py).
//
// Requests are sent with `outlive_socket: true`, and each conversation's state (its text so far and
// the `last_seq` it has) is saved in this browser. A reload re-attaches every unfinished request with
// `attach` + `last_seq`, and the text continues with no gap and no duplicate.
import { ApiError, api, bindKeyField, element, openSocket } from "/static/common.js";

const STATE_KEY = "llm-fleet.playground";
const SAVE_EVERY_MS = 200;
const PARAMS = [  // [field, step]; a number, or text where there is no step. Empty: the API's default.
  ["max_tokens", "1"], ["temperature", "0.1"], ["top_p", "0.05"], ["seed", "1"], ["stop", null],
];

const state = loadState();
const views = new Map();  // conversation id -> its DOM nodes
let socket = null;
let reconnectMs = 500;
let retryTimer = null;
let models = [];
let saveTimer = null;

function loadState() {
  try {
    const saved = JSON.parse(localStorage.getItem(STATE_KEY));
    if (saved && Array.isArray(saved.conversations)) return saved;
  } catch { /* a broken entry starts afresh */ }
  return { nextId: 1, conversations: [] };
}

function saveSoon() {
  if (saveTimer === null) saveTimer = setTimeout(saveNow, SAVE_EVERY_MS);
}

function saveNow() {
  clearTimeout(saveTimer);
  saveTimer = null;
  localStorage.setItem(STATE_KEY, JSON.stringify(state));
}

function newConversation() {
  const conversation = {
    id: `c${state.nextId++}`, mode: "chat", model: "",
    params: { max_tokens: "128", temperature: "0.7", top_p: "", seed: "", stop: "" }, system: "", messages: [],
    prompt: "", output: "", draft: "", inflight: null, stats: null, error: null,
  };
  state.conversations.push(conversation);
  saveNow();
  render(conversation);
}

// ---- the socket -------------------------------------------------------------------------------

function connect() {
  socket = openSocket("/ws/generate");
  socket.onopen = () => {
    reconnectMs = 500;
    setConnection("connected", false);
    for (const conversation of state.conversations) {
      const inflight = conversation.inflight;
      if (inflight?.request_id) {
        send({ type: "attach", id: conversation.id, request_id: inflight.request_id, last_seq: inflight.last_seq });
      } else if (inflight) {  // sent, never accepted: nothing to re-attach to
        fail(conversation, "the connection closed before the gateway accepted the request; send again");
      }
    }
  };
  socket.onmessage = (event) => receive(JSON.parse(event.data));
  socket.onclose = () => {
    setConnection(`disconnected; retrying in ${(reconnectMs / 1000).toFixed(1)} s (is the key right?)`, true);
    retryTimer = setTimeout(connect, reconnectMs);
    reconnectMs = Math.min(reconnectMs * 2, 5000);
  };
}

function reconnect() {
  clearTimeout(retryTimer);
  if (socket) {  // a socket that never opened (a wrong key) is replaced the same way
    socket.onclose = null;
    socket.close();
  }
  connect();
}

function send(message) {
  socket.send(JSON.stringify(message));
}

function setConnection(text, bad) {
  const node = document.getElementById("connection");
  node.textContent = text;
  node.className = bad ? "error" : "muted";
}

function receive(message) {
  const conversation = state.conversations.find((c) => c.id === message.id)
    || state.conversations.find((c) => c.inflight?.request_id === message.request_id);
  if (!conversation?.inflight) return;  // closed meanwhile, or a late message of a finished request
  const inflight = conversation.inflight;
  if (message.request_id && inflight.request_id && message.request_id !== inflight.request_id) return;
  if (message.type === "accepted") {
    inflight.request_id = message.request_id;
    saveNow();
    renderStats(conversation);
  } else if (message.type === "chunk") {
    if (message.seq <= inflight.last_seq) return;  // already have it (a re-attach overlaps nothing, but be sure)
    inflight.first_at ??= Date.now();
    appendOutput(conversation, message.text);
    inflight.last_seq = message.seq;
    saveSoon();
  } else if (message.type === "done") {
    finish(conversation, message);
  } else if (message.type === "error") {
    fail(conversation, `${message.status}: ${message.message}`);
  }
}

// ---- a request's life ----------------------------------------------------------------------------

function sendRequest(conversation) {
  const view = views.get(conversation.id);
  conversation.draft = view.input.value;
  const text = conversation.draft.trim();
  if (!text) return;
  const body = { type: "generate", id: conversation.id, model: conversation.model, outlive_socket: true };
  for (const [field, step] of PARAMS) {
    const value = conversation.params[field];
    if (value !== "" && value !== undefined) body[field] = step ? Number(value) : value;
  }
  if (conversation.mode === "chat") {
    const history = conversation.system.trim() ? [{ role: "system", content: conversation.system }] : [];
    conversation.messages.push({ role: "user", content: text });
    body.messages = [...history, ...conversation.messages];
    conversation.messages.push({ role: "assistant", content: "" });
  } else {
    conversation.prompt = text;
    conversation.output = "";
    body.prompt = text;
  }
  conversation.draft = "";
  conversation.error = null;
  conversation.stats = null;
  conversation.inflight = { request_id: null, last_seq: 0, sent_at: Date.now(), first_at: null };
  saveNow();
  renderTranscript(conversation);
  if (socket?.readyState !== WebSocket.OPEN) {
    fail(conversation, "not connected to the gateway; wait for the connection and send again");
    return;
  }
  send(body);
}

function stop(conversation) {
  const requestId = conversation.inflight?.request_id;
  if (requestId) send({ type: "cancel", id: conversation.id, request_id: requestId });
}

function appendOutput(conversation, text) {
  if (conversation.mode === "chat") conversation.messages.at(-1).content += text;
  else conversation.output += text;
  views.get(conversation.id).streaming?.append(text);
}

async function finish(conversation, done) {
  const inflight = conversation.inflight;
  conversation.inflight = null;
  conversation.stats = { request_id: inflight.request_id, finish_reason: done.finish_reason,
                         tokens: done.usage.completion_tokens,
                         ttft_ms: inflight.first_at ? inflight.first_at - inflight.sent_at : null };
  saveNow();
  renderTranscript(conversation);
  try {  // the fleet's own timings: generation speed without the network or a reload in between
    const polled = await api(`/v1/requests/${encodeURIComponent(inflight.request_id)}`);
    const t = polled.timings;
    if (t.total_s !== null && t.ttft_s !== null && done.usage.completion_tokens > 1 && t.total_s > t.ttft_s) {
      conversation.stats.tokens_per_s = (done.usage.completion_tokens - 1) / (t.total_s - t.ttft_s);
    }
    conversation.stats.ttft_ms ??= t.ttft_s === null ? null : t.ttft_s * 1000;
  } catch { /* the stats stay without the fleet's timings */ }
  saveNow();
  renderStats(conversation);
}

function fail(conversation, error) {
  const inflight = conversation.inflight;
  conversation.inflight = null;
  conversation.error = error;
  if (conversation.mode === "chat" && inflight && !inflight.request_id) {
    conversation.messages.splice(-2);  // never accepted: the turn did not happen
  }
  saveNow();
  renderTranscript(conversation);
}

// ---- rendering ------------------------------------------------------------------------------------

function render(conversation) {
  const input = element("textarea", { rows: 3, class: "input", placeholder: "Type a message, then Ctrl+Enter" });
  input.value = conversation.draft;
  input.addEventListener("input", () => { conversation.draft = input.value; saveSoon(); });
  input.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) sendRequest(conversation); });
  const modelSelect = element("select", { class: "model", title: "model",
    onchange: (e) => { conversation.model = e.target.value; saveNow(); } });
  const modeSelect = element("select", { class: "mode", title: "chat (messages) or a raw prompt",
    onchange: (e) => { conversation.mode = e.target.value; saveNow(); renderTranscript(conversation); } },
  element("option", { value: "chat" }, "Chat"), element("option", { value: "prompt" }, "Prompt"));
  modeSelect.value = conversation.mode;
  const params = PARAMS.map(([field, step]) => {
    const box = element("input", { type: step ? "number" : "text", step, name: field,
      value: conversation.params[field] ?? "", placeholder: step ? "" : "a stop string",
      oninput: (e) => { conversation.params[field] = e.target.value; saveSoon(); } });
    return element("label", {}, field, box);
  });
  const system = element("textarea", { rows: 1, class: "system", placeholder: "System prompt (optional)" });
  system.value = conversation.system;
  system.addEventListener("input", () => { conversation.system = system.value; saveSoon(); });
  const transcript = element("div", { class: "transcript" });
  const stats = element("div", { class: "stats" });
  const error = element("div", { class: "error" });
  const sendButton = element("button", { class: "primary send", onclick: () => sendRequest(conversation) }, "Send");
  const stopButton = element("button", { class: "danger stop", onclick: () => stop(conversation) }, "Stop");
  const clearButton = element("button", { class: "clear", onclick: () => {
    if (conversation.inflight) return;
    Object.assign(conversation, { messages: [], prompt: "", output: "", stats: null, error: null });
    saveNow();
    renderTranscript(conversation);
  } }, "Clear");
  const closeButton = element("button", { class: "close", title: "close this conversation", onclick: () => {
    stop(conversation);
    state.conversations = state.conversations.filter((c) => c !== conversation);
    saveNow();
    views.get(conversation.id).root.remove();
    views.delete(conversation.id);
  } }, "×");
  const root = element("section", { class: "conversation", "data-id": conversation.id },
    element("div", { class: "head" }, modelSelect, modeSelect, closeButton),
    element("div", { class: "params" }, params), system, transcript, input,
    element("div", { class: "actions" }, sendButton, stopButton, clearButton), stats, error);
  document.getElementById("conversations").append(root);
  views.set(conversation.id, { root, input, modelSelect, system, transcript, stats, error, sendButton, stopButton,
                               clearButton, streaming: null });
  renderModels(conversation);
  renderTranscript(conversation);
}

function renderModels(conversation) {
  const select = views.get(conversation.id).modelSelect;
  select.replaceChildren(...models.map((m) => element("option", { value: m.id }, `${m.id} (${m.state})`)));
  if (conversation.model && !models.some((m) => m.id === conversation.model)) {
    select.append(element("option", { value: conversation.model }, conversation.model));
  }
  if (!conversation.model && models.length) conversation.model = (models.find((m) => m.state === "ready") || models[0]).id;
  select.value = conversation.model;
}

function renderTranscript(conversation) {
  const view = views.get(conversation.id);
  const streamingNow = conversation.inflight !== null;
  const turns = conversation.mode === "chat"
    ? conversation.messages
    : (conversation.prompt ? [{ role: "prompt", content: conversation.prompt },
                              { role: "assistant", content: conversation.output }] : []);
  view.streaming = null;
  view.transcript.replaceChildren(...turns.map((turn, i) => {
    const text = element("span", { class: "text" }, turn.content);
    if (streamingNow && i === turns.length - 1) {
      text.classList.add("streaming");
      view.streaming = text;
    }
    return element("div", { class: `message ${turn.role}` }, element("span", { class: "role" }, turn.role), text);
  }));
  view.system.hidden = conversation.mode !== "chat";
  view.input.placeholder = conversation.mode === "chat" ? "Type a message, then Ctrl+Enter" : "A prompt, then Ctrl+Enter";
  view.input.value = conversation.draft;
  view.sendButton.disabled = streamingNow;
  view.stopButton.disabled = !streamingNow;
  view.clearButton.disabled = streamingNow;
  view.error.textContent = conversation.error || "";
  renderStats(conversation);
}

function renderStats(conversation) {
  const view = views.get(conversation.id);
  const s = conversation.stats;
  const requestId = conversation.inflight?.request_id || s?.request_id;
  const parts = [];
  if (requestId) parts.push(["request", requestId, "request-id"]);
  if (conversation.inflight) parts.push(["status", conversation.inflight.request_id ? "streaming" : "sending", "status"]);
  if (s) {
    if (s.ttft_ms !== null && s.ttft_ms !== undefined) parts.push(["TTFT", `${Math.round(s.ttft_ms)} ms`, "ttft"]);
    parts.push(["tokens", s.tokens, "tokens"]);
    if (s.tokens_per_s) parts.push(["tokens/s", s.tokens_per_s.toFixed(1), "tokens-per-s"]);
    parts.push(["finish", s.finish_reason, "finish-reason"]);
  }
  view.stats.replaceChildren(...parts.map(([label, value, name]) =>
    element("span", {}, `${label} `, element("b", { "data-stat": name }, value))));
}

// The models, into every conversation's menu; false when the fleet wants a key we do not have
// (the socket would be refused too).
async function loadModels() {
  const banner = document.getElementById("banner");
  let keyOk = true;
  try {
    models = (await api("/v1/models")).data;
    banner.textContent = models.length ? "" : "No model yet: start a worker (`make run` starts one).";
  } catch (error) {
    models = [];
    keyOk = !(error instanceof ApiError && error.status === 401);
    banner.textContent = keyOk ? `Could not list models: ${error.message}`
      : "This fleet uses API keys: enter yours above.";
  }
  for (const conversation of state.conversations) renderModels(conversation);
  if (!keyOk) setConnection("not connected: no valid API key", true);
  return keyOk;
}

document.getElementById("new-conversation").addEventListener("click", newConversation);
bindKeyField(async () => { if (await loadModels()) reconnect(); });
window.addEventListener("pagehide", saveNow);
if (!state.conversations.length) newConversation();
else state.conversations.forEach(render);
if (await loadModels()) connect();
