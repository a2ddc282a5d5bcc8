// The genset status page: polls /dashboard/state once a second and redraws. Plain DOM and SVG,
// no libraries and no build step. An API key (frontends run with --api-key) is taken from the
// page's #key=... fragment or the form, and kept in sessionStorage for this tab only.
"use strict";

const POLL_MS = 1000;
const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem("genset-key") || "";

(function keyFromFragment() {
  const m = location.hash.match(/key=([^&]+)/);
  if (m) {
    apiKey = decodeURIComponent(m[1]);
    sessionStorage.setItem("genset-key", apiKey);
    history.replaceState(null, "", location.pathname);  // keep the key out of the address bar
  }
})();

$("keyform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  apiKey = $("key").value;
  sessionStorage.setItem("genset-key", apiKey);
  $("keyform").hidden = true;
  poll();
});

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c));
  return node;
}

const fmt = {
  num: (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits)),
  pct: (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(0) + "%"),
  ms: (v) => (v === null || v === undefined ? "–" : v < 10 ? v.toFixed(2) + " ms" : v.toFixed(0) + " ms"),
  time: (ms) => new Date(ms).toLocaleTimeString(),
};

function kvBar(w) {
  const use = w.kv_use;
  if (use === null || use === undefined) return "–";
  const bar = el("span", { class: "bar" + (use > 0.95 ? " full" : use > 0.8 ? " high" : "") },
    el("span", {}));
  bar.firstChild.style.width = Math.min(100, 100 * use).toFixed(1) + "%";
  const pct = use < 0.1 ? (100 * use).toFixed(1) + "%" : fmt.pct(use);
  return el("span", { title: `${w.kv_used_blocks} of ${w.kv_blocks} blocks` }, bar, pct,
    el("span", { class: "muted" }, ` ${w.kv_used_blocks}/${w.kv_blocks}`));
}

function renderWorkers(workers) {
  const body = $("workers");
  const rows = workers.map((w) => el("tr", { "data-worker-id": w.id },
    el("td", {}, w.id), el("td", {}, w.model), el("td", {}, w.role), el("td", {}, w.engine),
    el("td", {}, kvBar(w)),
    el("td", {}, w.running ?? "–"), el("td", {}, w.waiting ?? "–"),
    el("td", {}, fmt.ms(w.step_ms)), el("td", {}, w.routed), el("td", {}, fmt.pct(w.hit_rate)),
    el("td", { class: w.report_age_s > 5 ? "stale" : "" },
      w.report_age_s === null ? "none yet" : fmt.num(w.report_age_s) + " s ago")));
  if (!rows.length) rows.push(el("tr", {}, el("td", { class: "empty", colSpan: 11 }, "no workers")));
  body.replaceChildren(...rows);
  $("worker-count").textContent = workers.length;
}

function renderDecisions(decisions) {
  const rows = decisions.map((d) => el("tr", { "data-request-id": d.request_id },
    el("td", {}, fmt.time(d.ts_ms)), el("td", {}, d.request_id.slice(0, 16)),
    el("td", {}, d.worker), el("td", {}, d.policy), el("td", {}, d.prompt_tokens),
    el("td", {}, d.cached_tokens)));
  if (!rows.length) rows.push(el("tr", {}, el("td", { class: "empty", colSpan: 6 }, "none yet")));
  $("decisions").replaceChildren(...rows);
}

// One line chart into an <svg viewBox="0 0 300 90">; gaps (null) break the line.
function chart(id, t, values, unit) {
  const svg = $("chart-" + id);
  const ns = "http://www.w3.org/2000/svg";
  const W = 300, H = 90;
  const nums = values.filter((v) => v !== null);
  const max = Math.max(1e-9, ...nums) * 1.1;
  const t0 = t.length ? t[t.length - 1] - 300 : 0;
  const x = (ts) => ((ts - t0) / 300) * W;
  const y = (v) => H - (v / max) * (H - 4) - 2;
  const parts = [];
  let current = [];
  values.forEach((v, i) => {
    if (v === null) { if (current.length) parts.push(current); current = []; return; }
    current.push(`${x(t[i]).toFixed(1)},${y(v).toFixed(1)}`);
  });
  if (current.length) parts.push(current);
  const nodes = [];
  const base = document.createElementNS(ns, "line");
  base.setAttribute("x1", 0); base.setAttribute("x2", W);
  base.setAttribute("y1", H - 1); base.setAttribute("y2", H - 1);
  nodes.push(base);
  for (const p of parts) {
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", p.length === 1 ? `${p[0]} ${p[0]}` : p.join(" "));
    nodes.push(line);
  }
  svg.replaceChildren(...nodes);
  $("axis-" + id).replaceChildren(el("span", {}, "−5 min"),
    el("span", {}, nums.length ? `max ${fmt.num(max / 1.1, 2)} ${unit}` : "no data"),
    el("span", {}, "now"));
}

// The mean over the last `n` points that have a value (null: none).
function recentMean(values, n) {
  const xs = values.slice(-n).filter((v) => v !== null);
  return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : null;
}

function renderPlanner(planner) {
  $("planner-section").hidden = !planner;
  if (!planner) return;
  const pills = Object.entries(planner.pools).map(([role, n]) =>
    el("span", { class: "pill" }, `${role}: ${n} wanted, ${planner.ready[role] ?? "?"} ready`));
  $("planner").replaceChildren(...pills,
    el("div", { class: "muted" }, `${planner.policy} policy, decision ${planner.decision_id} at ` +
      `${fmt.time(planner.ts_ms)}: ${planner.reason}`));
}

function gib(bytes) {
  const b = Number(bytes || 0);
  return b ? (b / 2 ** 30).toFixed(1) + " GiB" : "off";
}

function renderOffload(stores) {
  $("offload-section").hidden = !stores.length;
  $("offload").replaceChildren(...stores.map((s) => el("tr", { "data-store-id": s.id },
    el("td", {}, s.id), el("td", {}, s.host), el("td", {}, gib(s.labels.ram_bytes)),
    el("td", {}, gib(s.labels.disk_bytes)))));
}

function render(state) {
  $("namespace").textContent = "namespace " + state.namespace;
  $("models").textContent = state.models.length ? "models: " + state.models.join(", ") : "no models";
  renderWorkers(state.workers);
  renderDecisions(state.decisions);
  const s = state.series;
  chart("rps", s.t, s.requests_per_s, "/s");
  chart("ttft", s.t, s.ttft_ms, "ms");
  chart("itl", s.t, s.itl_ms, "ms");
  chart("tps", s.t, s.output_tokens_per_s, "/s");
  $("rps-now").textContent = fmt.num(recentMean(s.requests_per_s, 10), 2);
  $("ttft-now").textContent = fmt.ms(recentMean(s.ttft_ms, 60));
  $("itl-now").textContent = fmt.ms(recentMean(s.itl_ms, 60));
  $("hit-now").textContent = fmt.pct(state.totals.hit_rate);
  $("pools").textContent = Object.entries(state.pools).map(([r, n]) => `${r} ${n}`).join(" · ") || "–";
  renderPlanner(state.planner);
  renderOffload(state.offload);
}

let timer = null;
async function poll() {
  clearTimeout(timer);
  const status = $("status");
  try {
    const headers = apiKey ? { Authorization: "Bearer " + apiKey } : {};
    const resp = await fetch("/dashboard/state", { headers, cache: "no-store" });
    if (resp.status === 401) {
      $("keyform").hidden = false;
      status.textContent = "API key needed";
      status.className = "status error";
      return;  // the form's submit polls again
    }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
    status.textContent = "updated " + new Date().toLocaleTimeString();
    status.className = "status";
  } catch (err) {
    status.textContent = "cannot reach the frontend: " + err.message;
    status.className = "status error";
  }
  timer = setTimeout(poll, POLL_MS);
}

poll();
