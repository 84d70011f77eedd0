// natkit inspector page: lists captured requests live (server-sent events from
// /api/events carry summaries), shows one in detail (fetched when selected), replays it
// (as captured or changed).
"use strict";

const API = "/api/requests/http";
const MAX_ROWS = 1000; // the page keeps the newest; the API holds what the buffer holds
const records = new Map(); // id -> record or its summary (ngrok's JSON shape plus .natkit)
let selected = null;
let shown = 0; // a counter: a late answer for an earlier selection is not shown

const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};

function bytesOf(b64) {
  const bin = atob(b64 || "");
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function textOf(bytes) {
  try { return new TextDecoder("utf-8", { fatal: true }).decode(bytes); } catch { return null; }
}

// Bytes as text where printable, escapes elsewhere: nothing hidden, nothing lost.
function escaped(bytes) {
  let s = "";
  for (const b of bytes) {
    if (b === 10) s += "\\n\n";
    else if (b === 13) s += "\\r";
    else if (b === 9) s += "\t";
    else if (b >= 32 && b < 127) s += String.fromCharCode(b);
    else s += "\\x" + b.toString(16).padStart(2, "0");
  }
  return s;
}

function hexdump(bytes) {
  const lines = [];
  for (let i = 0; i < bytes.length; i += 16) {
    const row = bytes.slice(i, i + 16);
    const hex = Array.from(row, (b) => b.toString(16).padStart(2, "0")).join(" ");
    const asc = Array.from(row, (b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : ".")).join("");
    lines.push(i.toString(16).padStart(8, "0") + "  " + hex.padEnd(48) + " " + asc);
  }
  return lines.join("\n");
}

function header(headers, name) {
  for (const [k, v] of Object.entries(headers || {})) if (k.toLowerCase() === name) return v[0];
  return "";
}

// The body as the page shows it: JSON pretty-printed, text as text, else a hex dump.
function bodyView(bytes, ctype) {
  if (!bytes.length) return "(empty)";
  const text = textOf(bytes);
  if (text === null) return hexdump(bytes);
  if (/json/i.test(ctype) || /^\s*[[{]/.test(text)) {
    try { return JSON.stringify(JSON.parse(text), null, 2); } catch { /* not JSON after all */ }
  }
  return text;
}

function ms(ns) { return ns ? (ns / 1e6).toFixed(ns < 1e7 ? 2 : 0) + " ms" : "…"; }

function statusCell(rec) {
  if (!rec.response) return el("td", { class: "pending" }, rec.natkit.complete ? "none" : "…");
  return el("td", { class: "s" + String(rec.response.status_code)[0] }, String(rec.response.status_code));
}

function row(rec) {
  const tr = el("tr", { "data-id": rec.id },
    el("td", {}, new Date(rec.start).toLocaleTimeString()),
    el("td", {}, rec.request.method),
    el("td", { class: "path", title: rec.request.uri }, rec.request.uri),
    statusCell(rec),
    el("td", {}, ms(rec.duration)),
    el("td", {}, rec.natkit.replay_of ? "replay" : rec.remote_addr));
  tr.addEventListener("click", () => select(rec.id));
  if (rec.id === selected) tr.classList.add("sel");
  return tr;
}

function upsert(rec, fresh) {
  const had = records.has(rec.id);
  records.set(rec.id, rec);
  const tbody = $("requests").tBodies[0];
  const tr = row(rec);
  const old = tbody.querySelector(`tr[data-id="${rec.id}"]`);
  if (old) old.replaceWith(tr);
  else tbody.prepend(tr);
  if (fresh && !had) tr.classList.add("new");
  while (tbody.rows.length > MAX_ROWS) {
    const last = tbody.rows[tbody.rows.length - 1];
    if (last.dataset.id === selected) break;
    records.delete(last.dataset.id);
    last.remove();
  }
  $("empty").hidden = records.size > 0;
  if (rec.id === selected) detail(rec.id);
}

function messageView(msg, body, ctype, truncated, raw) {
  const box = el("div");
  const kv = el("table", { class: "kv" });
  for (const [k, vs] of Object.entries(msg.headers || {})) for (const v of vs) kv.append(el("tr", {}, el("td", {}, k), el("td", {}, v)));
  box.append(el("h3", {}, "Headers"), kv);
  const pre = el("pre", { class: "body" });
  const views = {
    body: () => bodyView(body, ctype) + (truncated ? "\n… (cut at the capture limit)" : ""),
    raw: () => escaped(raw),
    hex: () => hexdump(raw),
  };
  const tabs = el("div", { class: "tabs" });
  for (const name of Object.keys(views)) {
    const b = el("button", { type: "button", "data-view": name }, name);
    b.addEventListener("click", () => {
      pre.textContent = views[name]();
      for (const x of tabs.children) x.classList.toggle("on", x === b);
    });
    tabs.append(b);
  }
  tabs.firstChild.classList.add("on");
  pre.textContent = views.body();
  box.append(el("h3", {}, "Body ", tabs), pre);
  return box;
}

function show(rec) {
  $("detail").hidden = false;
  const n = rec.natkit;
  const status = rec.response ? rec.response.status : "no response yet";
  $("summary").textContent = `${rec.request.method} ${rec.request.uri} → ${status} · ${ms(rec.duration)} · from ${n.replay_of ? "a replay of " + n.replay_of : n.visitor} · ${rec.start}`;
  if (n.note) $("summary").append(el("div", { class: "note" }, n.note));
  const rq = rec.request;
  $("req").replaceChildren(
    el("pre", {}, `${rq.method} ${rq.uri} ${rq.proto}`),
    messageView(rq, bytesOf(n.request_body), header(rq.headers, "content-type"), n.request_truncated, bytesOf(rq.raw)));
  const rs = rec.response;
  $("resp").replaceChildren(rs
    ? messageView(rs, bytesOf(n.response_body), header(rs.headers, "content-type"), n.response_truncated, bytesOf(rs.raw))
    : el("p", { class: "pending" }, n.complete ? "No response was captured." : "Waiting for the response…"));
}

// The whole record (headers, bodies, bytes) of the selected row, then shown.
async function detail(id) {
  const mine = ++shown;
  try {
    const rec = await api("GET", `${API}/${id}`);
    records.set(id, rec);
    if (mine === shown && selected === id) show(rec);
  } catch (e) {
    if (mine === shown) $("summary").textContent = "gone from the buffer: " + e.message;
  }
}

function select(id) {
  selected = id;
  for (const tr of $("requests").tBodies[0].rows) tr.classList.toggle("sel", tr.dataset.id === id);
  $("editor").hidden = true;
  $("replay-result").textContent = "";
  detail(id);
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  const res = await fetch(path, opts);
  if (!res.ok) {
    let msg = res.statusText;
    try { msg = (await res.json()).msg; } catch { /* no JSON */ }
    throw new Error(msg);
  }
  return res.status === 204 ? null : res.json();
}

async function replay(changes) {
  const rec = records.get(selected);
  $("replay-result").textContent = "replaying…";
  try {
    const made = await api("POST", `${API}/${rec.id}/replay`, changes || {});
    upsert(made, true);
    $("replay-result").textContent = `replayed: ${made.response ? made.response.status : "no response"}`;
  } catch (e) {
    $("replay-result").textContent = "replay failed: " + e.message;
  }
}

function openEditor() {
  const rec = records.get(selected);
  const rq = rec.request;
  $("edit-method").value = rq.method;
  $("edit-path").value = rq.uri;
  const lines = [];
  for (const [k, vs] of Object.entries(rq.headers)) {
    if (k.toLowerCase() === "content-length" || k.toLowerCase() === "transfer-encoding") continue;
    for (const v of vs) lines.push(`${k}: ${v}`);
  }
  $("edit-headers").value = lines.join("\n");
  $("edit-body").value = textOf(bytesOf(rec.natkit.request_body)) ?? "";
  $("editor").hidden = false;
}

function sendEdited(ev) {
  ev.preventDefault();
  const headers = [];
  for (const line of $("edit-headers").value.split("\n")) {
    if (!line.trim()) continue;
    const i = line.indexOf(":");
    if (i <= 0) { $("replay-result").textContent = `not a header line: ${line}`; return; }
    headers.push([line.slice(0, i).trim(), line.slice(i + 1).trim()]);
  }
  $("editor").hidden = true;
  replay({ method: $("edit-method").value.trim(), uri: $("edit-path").value.trim(), headers, body: $("edit-body").value });
}

function clearAll() {
  records.clear();
  selected = null;
  $("requests").tBodies[0].replaceChildren();
  $("detail").hidden = true;
  $("empty").hidden = false;
}

const MAX_REFUSED_ROWS = 500;
let refusedTotal = 0;

// A visitor the relay refused (natkit's access control): newest on top, with the reason.
function refused(r, fresh) {
  refusedTotal += 1 + (r.more || 0);
  $("refused-box").hidden = false;
  $("refused-count").textContent = String(refusedTotal);
  const tr = el("tr", fresh ? { class: "new" } : {},
    el("td", {}, new Date(r.time).toLocaleTimeString()), el("td", {}, r.remote_addr),
    el("td", { class: "s4" }, r.reason), el("td", {}, r.more ? `+${r.more}` : ""));
  const body = $("refused").tBodies[0];
  body.prepend(tr);
  while (body.rows.length > MAX_REFUSED_ROWS) body.deleteRow(-1);
}

async function load() {
  const [list, tunnels, status, refusals] = await Promise.all([api("GET", `${API}?limit=500`), api("GET", "/api/tunnels"), api("GET", "/api/inspect/status"), api("GET", "/api/refused")]);
  refusedTotal = 0;
  $("refused").tBodies[0].replaceChildren();
  for (const r of refusals.refused.reverse()) refused(r, false);
  $("tunnels").replaceChildren(...tunnels.tunnels.map((t) => el("li", {}, `${t.public_url} → ${t.config.addr}`)));
  for (const rec of list.requests.reverse()) upsert(rec, false);
  const last = status.paused[status.paused.length - 1];
  $("paused").hidden = !last;
  if (last) {
    const t = (iso) => new Date(iso).toLocaleString();
    $("paused").textContent = `Capture was paused (nobody looked for ${status.idle} s) from ${t(last.from)} to ${last.to ? t(last.to) : "now"}; connections opened meanwhile are not captured.`;
  }
}

function live() {
  const es = new EventSource("/api/events");
  let lost = false;
  const on = (state) => { $("live").className = state ? "on" : "off"; $("live").textContent = state ? "live" : "reconnecting…"; };
  es.onopen = () => {
    on(true);
    if (lost) load().catch(() => {}); // what came while the stream was down
    lost = false;
  };
  es.onerror = () => { on(false); lost = true; };
  for (const kind of ["request", "response"]) es.addEventListener(kind, (ev) => upsert(JSON.parse(ev.data), true));
  es.addEventListener("clear", clearAll);
  es.addEventListener("refused", (ev) => refused(JSON.parse(ev.data), true));
}

document.addEventListener("DOMContentLoaded", () => {
  $("replay").addEventListener("click", () => replay(null));
  $("replay-edit").addEventListener("click", openEditor);
  $("edit-cancel").addEventListener("click", () => { $("editor").hidden = true; });
  $("editor").addEventListener("submit", sendEdited);
  $("clear").addEventListener("click", () => api("DELETE", API).catch(() => {}));
  live();
  load().catch((e) => { $("empty").textContent = "cannot load the requests: " + e.message; });
});
