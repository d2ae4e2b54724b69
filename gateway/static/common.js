// Shared by the playground and the console: the API key (kept in this browser only) and API calls.
const KEY_STORAGE = "llm-fleet.apiKey";

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

// The header's key field: shows the stored key, stores edits, tells `onChange`.
export function bindKeyField(onChange) {
  const field = document.getElementById("api-key");
  field.value = apiKey();
  field.addEventListener("change", () => {
    const key = field.value.trim();
    if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
    onChange(key);
  });
}

export class ApiError extends Error {
  constructor(status, message) {
    super(`${status}: ${message}`);
    this.status = status;
  }
}

// fetch() with the key; the JSON reply, or an ApiError carrying the API's own message.
export async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body) });
  const text = await response.text();
  let reply = null;
  try { reply = text ? JSON.parse(text) : null; } catch { reply = null; }
  if (!response.ok) {
    throw new ApiError(response.status, reply?.error?.message || text || response.statusText);
  }
  return reply;
}

// Browsers cannot set headers on a WebSocket: the key travels as a subprotocol (gateway/auth.py).
export function openSocket(path) {
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`;
  const key = apiKey();
  return new WebSocket(url, key ? ["llm-fleet", `bearer.${key}`] : ["llm-fleet"]);
}

export function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}
