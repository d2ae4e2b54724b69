// The console: the fleet from GET /v1/fleet, refreshed every few seconds; load and unload models
// through /admin/models/{name}/load|unload (an admin key), whose progress shows in the workers table.
import { api, bindKeyField, element } from "/static/common.js";

const REFRESH_MS = 2000;
let lastGood = 0;
const chosenToLoad = new Map();  // worker id -> the model picked in its Load menu (kept across refreshes)
// A refresh rebuilds the tables: one landing between a button's press and its release would swallow the
// click (the press on the old button, the release on the new one). Renders wait while a pointer is down.
let pointerDown = false;
let pendingFleet = null;
document.addEventListener("pointerdown", () => { pointerDown = true; }, true);
document.addEventListener("pointerup", () => {
  pointerDown = false;
  if (pendingFleet) setTimeout(() => { if (!pointerDown && pendingFleet) { render(pendingFleet); pendingFleet = null; } });
}, true);

function bar(fraction) {
  const fill = element("span");
  fill.style.width = `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)}%`;  // CSSOM: allowed by the CSP
  return element("span", { class: "bar" }, fill);
}

function card(label, value, name) {
  return element("div", { class: "card" }, element("div", { class: "value", "data-card": name }, value),
    element("div", { class: "label" }, label));
}

function gib(bytes) {
  return `${(bytes / 2 ** 30).toFixed(1)} GiB`;
}

function gpuCell(gpu) {
  const devices = gpu?.devices || [];
  if (!devices.length) return element("span", { class: "muted", title: gpu?.reason || "" }, "none");
  return devices.map((d) => `#${d.index} ${Math.round((d.utilization || 0) * 100)}% · `
    + `${gib(d.memory_used_bytes)}/${gib(d.memory_total_bytes)}`).join("\n");
}

async function control(action, model, workerId) {
  const log = document.getElementById("action-log");
  log.className = "muted";
  log.textContent = `${action} ${model} on ${workerId}…`;
  try {
    const reply = await api(`/admin/models/${encodeURIComponent(model)}/${action}`,
      { method: "POST", body: { workers: [workerId] } });
    log.textContent = `${action} ${model} on ${workerId}: sent (job ${reply.workers.map((w) => w.job_id).join(", ")}); `
      + "progress shows in the table";
  } catch (error) {
    log.className = "error";
    log.textContent = `${action} ${model} on ${workerId} refused: ${error.message}`;
  }
  refresh();
}

function workerRows(worker) {
  const models = Object.entries(worker.models).sort(([a], [b]) => a.localeCompare(b));
  const loadable = worker.catalogue.filter((name) => !(name in worker.models));
  const loadSelect = element("select", { class: "load-model",
    onchange: (e) => chosenToLoad.set(worker.worker_id, e.target.value) },
  loadable.map((n) => element("option", { value: n }, n)));
  if (loadable.includes(chosenToLoad.get(worker.worker_id))) loadSelect.value = chosenToLoad.get(worker.worker_id);
  const loadCell = worker.state === "serving" && loadable.length
    ? element("span", {}, loadSelect, " ", element("button", { class: "load",
      onclick: () => control("load", loadSelect.value, worker.worker_id) }, "Load"))
    : "";
  const rate = worker.tokens_per_s === null ? "–" : worker.tokens_per_s.toFixed(0);
  const rows = (models.length ? models : [[null, null]]).map(([name, m], i) => {
    const first = i === 0;
    const kv = m && m.kv_capacity_tokens
      ? element("span", {}, bar(m.kv_used_tokens / m.kv_capacity_tokens),
        `${m.kv_used_tokens} / ${m.kv_capacity_tokens}`) : "–";
    let modelState = m ? element("span", { class: `state-${m.state}` }, m.state) : "–";
    if (m?.state === "loading") {
      modelState = element("span", { class: "state-loading" }, bar(m.progress), `loading ${Math.round(m.progress * 100)}%`);
    } else if (m?.state === "failed") {
      modelState = element("span", { class: "state-failed", title: m.error || "" }, `failed: ${m.error || ""}`);
    }
    const unload = m && m.state !== "loading"
      ? element("button", { class: "unload danger", onclick: () => control("unload", name, worker.worker_id) }, "Unload")
      : "";
    return element("tr", { "data-worker": worker.worker_id, "data-model": name || "" },
      element("td", {}, first ? element("span", { title: `${worker.host} pid ${worker.pid}` }, worker.worker_id) : ""),
      element("td", { class: `state-${worker.state}` }, first ? worker.state : ""),
      element("td", {}, name || "–"),
      element("td", { class: "model-state" }, modelState),
      element("td", {}, m ? `${m.running} / ${m.max_num_seqs}` : "–"),
      element("td", { class: "nowrap" }, kv),
      element("td", {}, first ? rate : ""),
      element("td", { class: "gpu" }, first ? gpuCell(worker.gpu) : ""),
      element("td", { class: "nowrap" }, unload, first && unload ? " " : "", first ? loadCell : ""));
  });
  return rows;
}

function render(fleet) {
  const queues = Object.entries(fleet.queues).sort(([a], [b]) => a.localeCompare(b));
  const sum = (field) => queues.reduce((total, [, q]) => total + q[field], 0);
  const ready = new Set(fleet.workers.flatMap((w) => Object.entries(w.models)
    .filter(([, m]) => m.state === "ready").map(([name]) => name)));
  document.getElementById("cards").replaceChildren(
    card("workers", fleet.workers.length, "workers"),
    card("models ready", ready.size, "models-ready"),
    card("tokens/s", fleet.workers.reduce((t, w) => t + (w.tokens_per_s || 0), 0).toFixed(0), "tokens-per-s"),
    card("waiting", sum("waiting"), "waiting"),
    card("429s", sum("rejected"), "rejected"),
    card("dead letters", sum("dead_letters"), "dead-letters"));
  document.querySelector("#workers tbody").replaceChildren(...fleet.workers.flatMap(workerRows));
  if (!fleet.workers.length) {
    document.querySelector("#workers tbody").append(element("tr", {}, element("td", { colspan: 9, class: "muted" },
      "No live worker. Requests queue until one starts.")));
  }
  document.querySelector("#queues tbody").replaceChildren(...queues.map(([name, q]) =>
    element("tr", { "data-queue": name },
      element("td", {}, name), element("td", {}, q.outstanding), element("td", {}, q.waiting),
      element("td", {}, q.held_by_workers), element("td", {}, `${q.oldest_waiting_s.toFixed(1)} s`),
      element("td", {}, q.dead_letters), element("td", { "data-rejected": name }, q.rejected))));
}

async function refresh() {
  const banner = document.getElementById("banner");
  try {
    const fleet = await api("/v1/fleet");
    if (pointerDown) pendingFleet = fleet;
    else render(fleet);
    banner.textContent = "";
    lastGood = Date.now();
  } catch (error) {
    banner.textContent = error.status === 401 ? "This fleet uses API keys: enter yours above."
      : `Could not read the fleet: ${error.message}`;
  }
}

function tick() {
  const updated = document.getElementById("updated");
  updated.textContent = lastGood ? `updated ${((Date.now() - lastGood) / 1000).toFixed(0)} s ago · every `
    + `${REFRESH_MS / 1000} s` : "not loaded yet";
}

bindKeyField(refresh);
refresh();
setInterval(refresh, REFRESH_MS);
setInterval(tick, 500);
