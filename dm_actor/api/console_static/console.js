// dm_actor's operator console: plain JavaScript, no build step, nothing loaded from elsewhere.
// Every call goes to the daemon's API with the administrator key kept in sessionStorage.
"use strict";

const KEY_NAME = "dmActorAdminKey";
const PAGE = 20;               // devices per page
const MAX_EVENT_ROWS = 500;    // rows kept in the live-events table
const MAX_PAUSED = 1000;       // events kept while paused (beyond: counted, not shown)
const $ = (id) => document.getElementById(id);

const state = {
  key: sessionStorage.getItem(KEY_NAME),
  search: "", afters: [null], page: 0,
  device: null, commands: new Map(),
  ws: null, paused: false, held: [], skipped: 0, dropped: 0, received: 0,
  glanceTimer: null,
};

// -- the API ---------------------------------------------------------------------------------

async function api(method, path, body) {
  const init = { method, headers: { "Authorization": "Bearer " + state.key } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (e) { data = text; }
  if (response.status === 401) { logout("The key was refused (401)."); }
  return { status: response.status, data };
}

function cell(row, content, cls) {
  const td = row.insertCell();
  if (content instanceof Node) td.appendChild(content); else td.textContent = content ?? "";
  if (cls) td.className = cls;
  return td;
}

function button(label, cls, onclick) {
  const b = document.createElement("button");
  b.type = "button"; b.textContent = label; b.className = cls; b.onclick = onclick;
  return b;
}

function shown(values, error) {
  if (error) return "(" + error + ")";
  if (!values || !values.length) return "";
  if (values.length === 1) {
    const v = values[0];
    return String(v.value) + (v.units ? " " + v.units : "");
  }
  return values.map((v) => v.path + "=" + v.value + (v.units ? " " + v.units : "")).join("; ");
}

// -- log in / out ----------------------------------------------------------------------------

async function login(key) {
  state.key = key;
  const r = await api("GET", "/admin/overview");
  if (r.status !== 200) {
    const why = r.status === 403 ? "This is not an administrator key (403)." : "Refused: " + r.status;
    logout(why);
    return;
  }
  sessionStorage.setItem(KEY_NAME, key);
  $("login").hidden = true; $("nav").hidden = false; $("glance").hidden = false;
  glance(r.data);
  clearInterval(state.glanceTimer);
  state.glanceTimer = setInterval(refreshGlance, 2000);
  openTap();
  if (!location.hash || location.hash === "#/login") location.hash = "#/devices";
  route();
}

function logout(message) {
  sessionStorage.removeItem(KEY_NAME);
  state.key = null;
  clearInterval(state.glanceTimer);
  if (state.ws) { const ws = state.ws; state.ws = null; ws.close(); }
  for (const id of ["nav", "glance", "devices", "device", "events"]) $(id).hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

// -- the server at a glance ------------------------------------------------------------------

async function refreshGlance() {
  if (!state.key) return;
  const r = await api("GET", "/admin/overview");
  if (r.status === 200) glance(r.data);
}

function glance(o) {
  $("g-devices").textContent = o.devices_registered;
  $("g-commands").textContent = o.commands_in_flight;
  $("g-rate").textContent = o.events_per_second;
  $("g-backlog").textContent = o.store_backlog;
  $("g-waiting").textContent = o.answers_waiting;
  $("g-store").textContent = o.store_healthy ? "ok" : "retrying";
  $("g-tap").textContent = (state.ws && state.ws.readyState === 1 ? "open" : "closed") +
    (state.dropped ? ", " + state.dropped + " dropped" : "");
}

// -- views -----------------------------------------------------------------------------------

function show(view) {
  for (const id of ["devices", "device", "events"]) $(id).hidden = id !== view;
}

function route() {
  if (!state.key) { logout(); return; }
  const hash = location.hash || "#/devices";
  if (hash.startsWith("#/device/")) {
    show("device");
    loadDevice(decodeURIComponent(hash.slice("#/device/".length)));
  } else if (hash === "#/events") {
    show("events");
  } else {
    show("devices");
    loadDevices();
  }
}

// -- devices ---------------------------------------------------------------------------------

async function loadDevices() {
  const params = new URLSearchParams({ limit: String(PAGE), order: "ASC" });
  const after = state.afters[state.page];
  if (after) params.set("after", after);
  if (state.search) params.set("endpoint_name__prefix", state.search);
  const r = await api("GET", "/v3/devices?" + params);
  const body = $("device-table").tBodies[0];
  body.replaceChildren();
  if (r.status !== 200) { $("device-count").textContent = "error " + r.status; return; }
  const list = r.data;
  $("device-count").textContent = "(" + list.total_count + (state.search ? " matching" : "") + ")";
  for (const d of list.data) {
    const row = body.insertRow();
    row.dataset.endpoint = d.endpoint_name;
    const a = document.createElement("a");
    a.href = "#/device/" + encodeURIComponent(d.endpoint_name);
    a.textContent = d.endpoint_name;
    cell(row, a);
    cell(row, d.state);
    cell(row, d.binding);
    cell(row, d.queue_mode ? "yes" : "no");
    cell(row, d.security_mode ?? "-");
    cell(row, d.updated_at);
  }
  const last = list.data.length ? list.data[list.data.length - 1].endpoint_name : null;
  state.afters[state.page + 1] = last;
  $("next").disabled = !list.has_more;
  $("prev").disabled = state.page === 0;
}

// -- one device ------------------------------------------------------------------------------

async function loadDevice(endpoint) {
  state.device = endpoint;
  $("d-name").textContent = endpoint;
  const r = await api("GET", "/admin/devices/" + encodeURIComponent(endpoint));
  const info = $("d-info");
  info.replaceChildren();
  const body = $("resource-table").tBodies[0];
  body.replaceChildren();
  if (r.status !== 200) { info.textContent = "error " + r.status; return; }
  const d = r.data;
  const fields = [["state", d.state], ["binding", d.binding], ["queue mode", d.queue_mode ? "yes" : "no"],
    ["security", d.security_mode ?? "-"], ["transport", d.transport ?? "-"], ["LwM2M", d.lwm2m_version],
    ["lifetime", d.lifetime + " s"], ["registered", d.created_at], ["last contact", d.updated_at],
    ["type", d.endpoint_type || "-"]];
  for (const [name, value] of fields) {
    const dt = document.createElement("dt"); dt.textContent = name;
    const dd = document.createElement("dd"); dd.textContent = value;
    info.append(dt, dd);
  }
  const subscribed = new Set(d.subscribed);
  let object = null;
  for (const res of d.resources) {
    const id = res.path.split("/")[1];
    if (id !== object) {
      object = id;
      const head = body.insertRow();
      head.className = "object";
      const th = document.createElement("th");
      th.colSpan = 6;
      th.textContent = "/" + id + " " + (d.objects[id] || "(no model)");
      head.appendChild(th);
    }
    const row = body.insertRow();
    row.dataset.path = res.path;
    cell(row, res.path);
    cell(row, res.name + (res.units ? " (" + res.units + ")" : ""));
    cell(row, res.type);
    cell(row, res.operations);
    cell(row, "", "value");
    const actions = cell(row, "", "actions");
    const ops = res.operations;
    if (ops === "" || ops.includes("R")) actions.appendChild(button("Read", "read", () => read(res.path)));
    if (ops.includes("W")) {
      const input = document.createElement("input");
      input.className = "write-value"; input.placeholder = "value";
      actions.append(input, button("Write", "write", () => write(res.path, input.value)));
    }
    if (ops === "E") actions.appendChild(button("Execute", "exec", () => execute(res.path)));
    if (ops === "" || ops.includes("R")) {
      const on = subscribed.has(res.path);
      actions.appendChild(button(on ? "Stop" : "Observe", "observe", () => observe(res.path, row)));
      row.dataset.observing = on ? "yes" : "no";
    }
  }
  renderCommands();
  loadQueue();
}

function valueCell(path) {
  const row = document.querySelector('#resource-table tr[data-path="' + CSS.escape(path) + '"]');
  return row ? row.querySelector("td.value") : null;
}

async function command(method, path, extra) {
  const endpoint = state.device;
  const body = Object.assign({ method, uri: path }, extra || {});
  const r = await api("POST", "/admin/device-requests/" + encodeURIComponent(endpoint), body);
  const entry = { id: null, endpoint, request: method + " " + path, path, method,
    state: "refused", status: r.status, answer: typeof r.data === "string" ? r.data : "" };
  if (r.status === 202) {
    entry.id = r.data["async-response-id"];
    entry.state = "accepted (202)";
    entry.status = "";
    state.commands.set(entry.id, entry);
    poll(entry);
  } else {
    state.commands.set("refused-" + Date.now(), entry);
  }
  renderCommands();
  return entry;
}

const read = (path) => command("GET", path);
const execute = (path) => command("POST", path);
function write(path, value) {
  const payload = btoa(unescape(encodeURIComponent(value)));
  return command("PUT", path, { "content-type": "text/plain", "payload-b64": payload });
}

async function poll(entry) {
  for (let i = 0; i < 600 && entry.state !== "done"; i++) {
    const r = await api("GET", "/admin/async-responses/" + encodeURIComponent(entry.id));
    if (entry.state === "done") return;  // (the event tap brought it meanwhile)
    if (r.status === 200 && r.data.state === "done") { finish(entry, r.data); return; }
    if (r.status !== 200) { entry.state = "unknown"; renderCommands(); return; }
    entry.state = "pending"; renderCommands();
    await new Promise((ok) => setTimeout(ok, i < 20 ? 250 : 1000));
  }
}

function finish(entry, result) {
  if (entry.state === "done") return;
  const response = result.response || {};
  entry.state = "done";
  entry.status = response.status;
  entry.answer = response.error ? response.error : shown(result.values, result.decode_error);
  if (entry.method === "GET" && response.status === 200 && entry.endpoint === state.device) {
    const td = valueCell(entry.path);
    if (td) td.textContent = shown(result.values, result.decode_error);
  }
  renderCommands();
  if (entry.endpoint === state.device) loadQueue();
}

function renderCommands() {
  const body = $("command-table").tBodies[0];
  body.replaceChildren();
  for (const e of [...state.commands.values()].reverse()) {
    if (e.endpoint !== state.device) continue;
    const row = body.insertRow();
    row.dataset.id = e.id || "";
    cell(row, e.id || "-");
    cell(row, e.request);
    cell(row, e.state, e.state === "done" ? (e.status < 300 ? "state-done" : "state-failed") : "state-pending");
    cell(row, String(e.status ?? ""));
    cell(row, e.answer, "value");
  }
}

async function observe(path, row) {
  const endpoint = state.device;
  const target = "/admin/subscriptions/" + encodeURIComponent(endpoint) + path;
  const b = row.querySelector("button.observe");
  if (row.dataset.observing === "yes") {
    const r = await api("DELETE", target);
    if (r.status === 204) { row.dataset.observing = "no"; b.textContent = "Observe"; }
    return;
  }
  const r = await api("PUT", target);
  if (r.status === 200 || r.status === 202) {
    row.dataset.observing = "yes"; b.textContent = "Stop";
    if (r.status === 202) {
      const entry = { id: r.data["async-response-id"], endpoint, request: "OBSERVE " + path, path,
        method: "OBSERVE", state: "pending", status: "", answer: "" };
      state.commands.set(entry.id, entry);
      renderCommands();
      poll(entry);
    }
  } else {
    row.querySelector("td.value").textContent = "(observe refused: " + r.status + " " + (r.data || "") + ")";
  }
}

async function loadQueue() {
  const endpoint = state.device;
  const r = await api("GET", "/v2/device-requests/" + encodeURIComponent(endpoint));
  const body = $("queue-table").tBodies[0];
  body.replaceChildren();
  if (r.status !== 200 || endpoint !== state.device) return;
  for (const c of r.data.commands) {
    const row = body.insertRow();
    cell(row, c.async_id); cell(row, c.method); cell(row, c.uri);
    cell(row, c.in_flight ? "yes" : "no"); cell(row, c.attempts + " (" + c.attempts_left + " left)");
    cell(row, c.next_attempt_not_before || "-"); cell(row, c.expires_at); cell(row, c.waiting_for || "-");
  }
}

// -- live events (the administrators' event tap) ---------------------------------------------

function openTap() {
  if (state.ws || !state.key) return;
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/admin/events", ["pelion_" + state.key]);
  state.ws = ws;
  ws.onopen = () => { $("tap-state").textContent = "(connected)"; $("g-tap").textContent = "open"; };
  ws.onclose = () => {
    $("tap-state").textContent = "(disconnected)";
    if (state.ws === ws) { state.ws = null; setTimeout(openTap, 2000); }
  };
  ws.onmessage = (message) => {
    const data = JSON.parse(message.data);
    state.dropped = data.dropped;
    for (const event of data.events) onEvent(event);
    updateEventStats();
  };
}

function onEvent(event) {
  state.received++;
  const item = event.item;
  if (event.kind === "notifications" && item.ep === state.device) {
    const td = valueCell(item.path);
    if (td) {
      td.textContent = shown(event.values, event.decode_error);
      td.parentElement.classList.add("flash");
      td.parentElement.dataset.notified = String(Number(td.parentElement.dataset.notified || 0) + 1);
      setTimeout(() => td.parentElement.classList.remove("flash"), 600);
    }
  } else if (event.kind === "async-responses" && state.commands.has(item.id)) {
    finish(state.commands.get(item.id), { response: item, values: event.values,
      decode_error: event.decode_error });
  }
  if (state.paused) {
    if (state.held.length < MAX_PAUSED) state.held.push(event); else state.skipped++;
    return;
  }
  addEventRow(event);
}

function addEventRow(event) {
  const body = $("event-table").tBodies[0];
  const item = event.item;
  const row = body.insertRow(0);
  row.dataset.kind = event.kind;
  const isObject = typeof item === "object" && item !== null;
  cell(row, new Date().toISOString().slice(11, 23));
  cell(row, event.kind);
  cell(row, isObject ? (item.ep || event.ep || "") : item);
  cell(row, isObject ? (item.path || event.path || "") + (item.id ? " " + item.id : "") : "");
  cell(row, isObject && item.status !== undefined ? String(item.status) : "");
  cell(row, isObject ? (item.error || shown(event.values, event.decode_error)) : "", "value");
  cell(row, Array.isArray(event.to) ? event.to.join(", ") : event.to);
  while (body.rows.length > MAX_EVENT_ROWS) body.deleteRow(body.rows.length - 1);
}

function updateEventStats() {
  $("event-stats").textContent = state.received + " received" +
    (state.dropped ? ", " + state.dropped + " dropped by the server (this tap was too slow)" : "") +
    (state.paused ? ", paused: " + state.held.length + " held" +
      (state.skipped ? ", " + state.skipped + " not kept" : "") : "");
}

// -- wiring ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").onsubmit = (e) => { e.preventDefault(); login($("key").value.trim()); };
  $("logout").onclick = () => logout("Logged out.");
  $("search-form").onsubmit = (e) => {
    e.preventDefault();
    state.search = $("search").value.trim(); state.afters = [null]; state.page = 0;
    loadDevices();
  };
  $("next").onclick = () => { state.page++; loadDevices(); };
  $("prev").onclick = () => { state.page = Math.max(0, state.page - 1); loadDevices(); };
  $("queue-refresh").onclick = () => loadQueue();
  $("pause").onclick = () => {
    state.paused = !state.paused;
    $("pause").textContent = state.paused ? "Resume" : "Pause";
    if (!state.paused) {
      for (const event of state.held) addEventRow(event);
      state.held = []; state.skipped = 0;
    }
    updateEventStats();
  };
  $("clear").onclick = () => { $("event-table").tBodies[0].replaceChildren(); };
  window.addEventListener("hashchange", route);
  if (state.key) login(state.key); else logout();
});
