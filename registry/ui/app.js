// The Trellis dashboard: plain JavaScript over the registry's own API.
//
// - The main page holds one blocking query on GET /v1/overview (it answers
//   when any service changes) and polls GET /v1/status every second (uptime,
//   rates and the expiry brake change without any service changing).
// - A service page holds one blocking query on GET /v1/services/<name>?all=true
//   and polls GET /v1/services/<name>/leases every second.
// - A token, when the registry wants one, is typed in once, kept in this tab's
//   sessionStorage and sent as Authorization: Bearer.
//
// The DOM is built with textContent only (metadata and health output are free
// text). <html data-state> says what the page shows (loading, live, auth,
// error) and data-updates counts the changes it rendered, for tests and for
// anyone who wants to know that it is live.
"use strict";

const TOKEN_KEY = "trellis.token";
const WAIT = "30s";
const POLL_MS = 1000;
const RETRY_MS = [500, 1000, 2000, 5000];

const $ = (id) => document.getElementById(id);
const root = document.documentElement;

let token = sessionStorage.getItem(TOKEN_KEY);
let view = null; // the running view's AbortController
let updates = 0;

class AuthError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// A GET of the registry's API: the parsed body and the headers that matter.
async function api(path, signal) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = "Bearer " + token;
  const resp = await fetch(path, { headers, signal, cache: "no-store", credentials: "omit" });
  let body = null;
  try {
    body = await resp.json();
  } catch (_) {
    body = null;
  }
  const message = body && body.message ? body.message : resp.status + " " + resp.statusText;
  if (resp.status === 401 || resp.status === 403) throw new AuthError(resp.status, message);
  if (!resp.ok) throw new Error(message);
  return { body, stale: resp.headers.get("X-Trellis-Stale") === "true" };
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(t);
      resolve();
    }, { once: true });
  });

// An element with attributes and children (strings become text nodes).
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function duration(ms) {
  if (ms === undefined || ms === null) return "–";
  if (ms < 1000) return ms + " ms";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(1) + " s";
  const total = Math.floor(s);
  const d = Math.floor(total / 86400);
  const h = Math.floor((total % 86400) / 3600);
  const m = Math.floor((total % 3600) / 60);
  const parts = [];
  if (d) parts.push(d + "d");
  if (h) parts.push(h + "h");
  if (m) parts.push(m + "m");
  parts.push((total % 60) + "s");
  return parts.join(" ");
}

function setState(s) {
  root.dataset.state = s;
}

function rendered() {
  updates += 1;
  root.dataset.updates = String(updates);
  $("updated").textContent = new Date().toLocaleTimeString();
}

function setConn(text, bad) {
  const c = $("conn");
  c.textContent = text;
  c.classList.toggle("bad", !!bad);
}

function showOnly(section) {
  for (const id of ["auth", "overview", "service"]) $(id).hidden = id !== section;
}

// The token form, with why it is shown.
function askToken(err) {
  if (view) view.abort();
  showOnly("auth");
  const why = err.status === 401
    ? (token ? "The registry does not know this token: " : "This registry needs a token: ")
    : "This token may not read this: ";
  $("auth-message").textContent = why + err.message;
  $("forget-token").hidden = !token;
  setConn("Not signed in", true);
  setState("auth");
  $("token").focus();
}

// ---- the main page ----

function statusFacts(s) {
  const facts = [
    ["Store", s.store],
    ["Replica", s.replica || "single (memory store)"],
    ["Stale", s.stale ? "yes: serving from cache" : "no"],
    ["Epoch", s.epoch],
    ["Uptime", duration(s.uptime_seconds * 1000)],
    ["Services", s.services],
    ["Instances", s.instances + " (" + s.healthy + " healthy)"],
    ["Registrations / min", s.rates.registrations_per_minute],
    ["Renewals / min", s.rates.renewals_per_minute],
    ["Expiry brake", !s.brake.enabled ? "off" : s.brake.engaged ? "ENGAGED" : "armed"],
    ["Protection threshold", s.protection_threshold > 0 ? Math.round(s.protection_threshold * 100) + " %" : "off"],
  ];
  const list = $("status-list");
  list.replaceChildren();
  for (const [k, v] of facts) {
    const key = k.toLowerCase().replace(/[^a-z]+/g, "-").replace(/-$/, "");
    list.append(el("div", { "data-fact": key }, el("dt", {}, k), el("dd", {}, String(v))));
  }
}

function showBrake(s) {
  const on = s.brake.enabled && s.brake.engaged;
  $("brake-banner").hidden = !on;
  if (on) {
    $("brake-text").textContent =
      " Fewer than " + Math.round(s.brake.threshold * 100) + " % of the expected renewals arrive, so expiry is" +
      " paused: " + s.brake.held + " instance(s) whose lease ran out are kept rather than removed." +
      " The likelier cause is the network near the registry, not dead instances.";
  }
  $("stale-banner").hidden = !s.stale;
}

async function statusLoop(signal) {
  let failures = 0;
  while (!signal.aborted) {
    try {
      const r = await api("/v1/status", signal);
      statusFacts(r.body);
      showBrake(r.body);
      $("status-note").hidden = true;
      failures = 0;
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof AuthError) {
        // The services still show: status needs what /metrics needs.
        $("status-list").replaceChildren();
        $("status-note").hidden = false;
        $("status-note").textContent =
          "The registry's status needs a token that may read /metrics (an admin token, or default = \"read\"): " +
          e.message;
      } else {
        failures += 1;
      }
    }
    await sleep(POLL_MS * Math.min(1 + failures, 5), signal);
  }
}

function serviceRow(s) {
  const healthy = s.passing + s.warning;
  const guards = [];
  if (healthy === 0) guards.push(el("span", { class: "badge down" }, "no healthy instance"));
  if (s.protected) {
    guards.push(el("span", {
      class: "badge protected",
      title: "Too few instances are healthy: discovery lists every instance, critical ones included.",
    }, "protection threshold holding"));
  }
  const count = (n, cls) => el("td", { class: "num" + (n > 0 ? " " + cls : ""), "data-col": cls }, n);
  return el("tr", {
    "data-service": s.name,
    "data-zones": s.zones.join(" "),
    class: healthy === 0 ? "down" : s.protected ? "protected" : null,
  },
  el("th", { scope: "row" }, el("a", { href: "#/service/" + encodeURIComponent(s.name) }, s.name)),
  el("td", { class: "num", "data-col": "instances" }, s.instances),
  count(s.passing, "passing"),
  count(s.warning, "warning"),
  count(s.critical, "critical"),
  el("td", { "data-col": "zones" }, s.zones.length ? s.zones.join(", ") : "–"),
  el("td", { "data-col": "guards" }, ...guards));
}

function applyFilter() {
  const q = $("filter").value.trim().toLowerCase();
  let shown = 0;
  const rows = $("services-body").rows;
  for (const row of rows) {
    const hit = !q || row.dataset.service.includes(q) || row.dataset.zones.toLowerCase().includes(q);
    row.hidden = !hit;
    if (hit) shown += 1;
  }
  $("filter-count").textContent = q ? shown + " of " + rows.length + " shown" : "";
}

function renderOverview(o, stale) {
  $("services-body").replaceChildren(...o.services.map(serviceRow));
  $("services-empty").hidden = o.services.length > 0;
  $("index-now").textContent = o.index;
  root.dataset.index = String(o.index);
  if (stale) $("stale-banner").hidden = false;
  applyFilter();
  rendered();
}

async function overviewLoop(signal) {
  let index = null;
  let epoch = null;
  let failures = 0;
  while (!signal.aborted) {
    try {
      const q = index === null ? "" : "?index=" + index + "&wait=" + WAIT + "&epoch=" + encodeURIComponent(epoch);
      const r = await api("/v1/overview" + q, signal);
      if (r.body.index !== index || r.body.epoch !== epoch) renderOverview(r.body, r.stale);
      index = r.body.index;
      epoch = r.body.epoch;
      failures = 0;
      setConn("Live", false);
      setState("live");
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof AuthError) return askToken(e);
      setConn("Cannot reach the registry: " + e.message + " (retrying)", true);
      setState("error");
      await sleep(RETRY_MS[Math.min(failures++, RETRY_MS.length - 1)], signal);
    }
  }
}

// ---- a service page ----

function statusCell(status) {
  return el("td", { "data-col": "status" }, el("span", { class: "badge " + status }, status));
}

function instanceRow(i, lease) {
  const meta = Object.entries(i.metadata || {});
  const leaseLeft = !lease ? "–" : lease.held ? "ran out: held by the brake" : duration(lease.left_ms);
  return el("tr", { "data-instance": i.id, class: i.status },
    el("th", { scope: "row" }, i.id),
    el("td", { "data-col": "address" }, i.address),
    el("td", { class: "num", "data-col": "port" }, i.port),
    el("td", { "data-col": "zone" }, i.zone || "–"),
    el("td", { class: "num", "data-col": "weight" }, i.weight),
    el("td", { "data-col": "tags" }, ...(i.tags || []).map((t) => el("span", { class: "tag" }, t))),
    el("td", { "data-col": "metadata" }, meta.length
      ? el("dl", { class: "meta" }, ...meta.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]))
      : "–"),
    statusCell(i.status),
    el("td", { "data-col": "output", class: "output" }, i.output || "–"),
    el("td", { class: "num", "data-col": "since-heartbeat" },
      lease && lease.since_renewal_ms !== undefined ? duration(lease.since_renewal_ms) + " ago" : "–"),
    el("td", { class: "num" + (lease && lease.held ? " held" : ""), "data-col": "lease-left" }, leaseLeft));
}

function renderService(page) {
  const v = page.view;
  if (!v) return;
  const leases = new Map((page.leases || []).map((l) => [l.id, l]));
  $("instances-body").replaceChildren(...v.instances.map((i) => instanceRow(i, leases.get(i.id))));
  $("instances-empty").hidden = v.instances.length > 0;
  const count = (s) => v.instances.filter((i) => i.status === s).length;
  $("service-summary").textContent =
    v.instances.length + " instance(s): " + count("passing") + " passing, " + count("warning") + " warning, " +
    count("critical") + " critical. Index " + v.index + ".";
  $("index-now").textContent = v.index;
}

async function serviceLoop(name, page, signal) {
  let index = null;
  let epoch = null;
  let failures = 0;
  const path = "/v1/services/" + encodeURIComponent(name) + "?all=true";
  while (!signal.aborted) {
    try {
      const q = index === null ? "" : "&index=" + index + "&wait=" + WAIT + "&epoch=" + encodeURIComponent(epoch);
      const r = await api(path + q, signal);
      const changed = r.body.index !== index || r.body.epoch !== epoch;
      index = r.body.index;
      epoch = r.body.epoch;
      page.view = r.body;
      if (r.stale) $("stale-banner").hidden = false;
      if (changed) {
        renderService(page);
        rendered();
      }
      failures = 0;
      setConn("Live", false);
      setState("live");
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof AuthError) return askToken(e);
      setConn("Cannot reach the registry: " + e.message + " (retrying)", true);
      setState("error");
      await sleep(RETRY_MS[Math.min(failures++, RETRY_MS.length - 1)], signal);
    }
  }
}

async function leasesLoop(name, page, signal) {
  while (!signal.aborted) {
    try {
      const r = await api("/v1/services/" + encodeURIComponent(name) + "/leases", signal);
      page.leases = r.body.leases;
      renderService(page);
    } catch (e) {
      if (signal.aborted) return;
      // The instance loop reports auth and connection errors.
    }
    await sleep(POLL_MS, signal);
  }
}

// ---- routing ----

function route() {
  if (view) view.abort();
  view = new AbortController();
  const signal = view.signal;
  setState("loading");
  $("forget-token").hidden = !token;
  const m = location.hash.match(/^#\/service\/([^/]+)$/);
  // The brake and stale banners belong to the whole registry: keep polling status on every page.
  statusLoop(signal);
  if (m) {
    const name = decodeURIComponent(m[1]);
    root.dataset.view = "service";
    showOnly("service");
    $("service-title").textContent = name;
    document.title = name + " · Trellis registry";
    $("instances-body").replaceChildren();
    const page = { view: null, leases: null };
    serviceLoop(name, page, signal);
    leasesLoop(name, page, signal);
  } else {
    root.dataset.view = "services";
    showOnly("overview");
    document.title = "Trellis registry";
    overviewLoop(signal);
  }
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value.trim();
  $("token").value = "";
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  route();
});
$("forget-token").addEventListener("click", () => {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  route();
});
$("filter").addEventListener("input", applyFilter);
window.addEventListener("hashchange", route);
route();
