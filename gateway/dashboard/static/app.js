// The dashboard page: reads the /api views with the bearer token kept in this tab's
// sessionStorage (or with the browser's client certificate), and draws them.  Text from
// the server goes into the page as text (textContent), never as HTML.
"use strict";

const REFRESH_MS = 5000; // the visible view is read again this often (each read is audited)
const KEY = "gateway-dashboard-token";
let current = "queue";
let timer = null;
let charts = {};
let me = null;

function token() { return sessionStorage.getItem(KEY); }

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  const t = token();
  if (t) headers.Authorization = "Bearer " + t;
  const response = await fetch(path, { ...options, headers, cache: "no-store", credentials: "same-origin" });
  if (response.status === 401) { showLogin("The token was refused."); throw new Error("401"); }
  if (!response.ok) throw new Error(path + ": " + response.status);
  return response.json();
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

function num(v) { return el("td", v === null || v === undefined ? "–" : v, "num"); }

function when(t) {
  if (t === null || t === undefined) return "–";
  const d = new Date(t * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function gigabytes(bytes) { return (bytes / 2 ** 30).toFixed(1) + " GB"; }

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

function pct(p) {
  if (!p || p.value === null) return "–";
  return `${(p.value * 100).toFixed(0)} % (${(p.low * 100).toFixed(0)}–${(p.high * 100).toFixed(0)}) ` +
    `${p.numerator}/${p.denominator}`;
}

function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
}

// --- the views ---------------------------------------------------------------------------

const VIEWS = {
  async queue() {
    const v = await api("/api/queue");
    const received = Object.entries(v.received).map(([k, n]) => `${n} ${k}`).join(", ") || "nothing";
    const studies = Object.entries(v.studies).map(([k, n]) => `${n} ${k}`).join(", ") || "none";
    document.getElementById("queue-summary").textContent =
      `Received: ${received}. Studies: ${studies}. Dead letters: ${v.dead_letters}.`;
    const disk = document.getElementById("queue-disk");
    const low = v.volumes.filter((d) => d.low);
    disk.textContent = v.volumes.length === 0 ? "" : "Free space: " + v.volumes.map((d) =>
      `${d.volume} ${d.free_bytes === null ? "unknown" : gigabytes(d.free_bytes)}`).join(", ") +
      (v.volumes[0].min_free_bytes ? ` (floor ${gigabytes(v.volumes[0].min_free_bytes)})` : "") +
      (low.length ? ". Below the floor: new studies and messages are refused until space returns." : ".");
    disk.className = low.length ? "soon" : "";
    fill("queue-table", v.depth.map((d) => row([
      d.stage, d.lane || "–", num(d.ready), num(d.leased), num(d.retrying), num(d.dead),
      num(d.done), el("td", duration(d.oldest_waiting_seconds), "num"),
    ])));
    return v.generated_at;
  },

  async studies() {
    const v = await api("/api/studies");
    fill("studies-table", v.studies.map((s) => {
      const tr = row([el("td", s.study, "key"), num(s.instances)]);
      tr.dataset.study = s.study;
      for (const step of s.steps) {
        const td = el("td", null, `step step-${step.state}`);
        td.dataset.step = step.step;
        td.dataset.state = step.state;
        td.appendChild(el("span", step.state === "done" ? "✓ " + when(step.at).slice(11) : step.state));
        if (step.seconds !== null) td.appendChild(el("small", "+" + duration(step.seconds)));
        tr.appendChild(td);
      }
      tr.appendChild(el("td", duration(s.total_seconds), "num"));
      return tr;
    }));
    return v.generated_at;
  },

  async dead() {
    const v = await api("/api/dead");
    document.getElementById("dead-hint").textContent = v.can_replay
      ? "Replay puts a dead letter back in the queue, its attempts reset."
      : "Replaying needs the operator role.";
    fill("dead-table", v.dead.map((d) => {
      const action = el("td");
      if (v.can_replay) {
        const b = el("button", "Replay");
        b.type = "button";
        b.addEventListener("click", () => replay(d.id, b));
        action.appendChild(b);
      }
      return row([num(d.id), d.stage, d.lane || "–", el("td", d.target, "key"), num(d.attempts),
        when(d.first_failed_at), el("td", d.last_error, "error-text"), action]);
    }));
    return v.generated_at;
  },

  async destinations() {
    const v = await api("/api/destinations");
    fill("destinations-table", v.destinations.map((d) => row([
      d.name, d.kind, when(d.last_success), num(d.waiting), num(d.retrying), num(d.dead),
      el("td", duration(d.oldest_undelivered_seconds), "num"),
    ])));
    return v.generated_at;
  },

  async certificates() {
    const v = await api("/api/certificates");
    fill("certificates-table", v.certificates.map((c) => row([
      c.name, num(c.days_left === null ? "unreadable" : c.days_left.toFixed(1)),
      el("td", c.expires_soon ? `expires within ${v.warn_days} days` : "", c.expires_soon ? "soon" : ""),
    ])));
    return v.generated_at;
  },

  async findings() {
    const v = await api("/api/findings");
    document.getElementById("findings-summary").textContent =
      `${v.runs} model runs in the last ${v.days} days.`;
    fill("concordance-table", v.concordance.map((c) => row([
      c.image_model, c.image_version, c.concept, num(c.studies), num(c.true_positive),
      num(c.false_positive), num(c.false_negative), num(c.true_negative), num(c.indeterminate),
      pct(c.sensitivity), pct(c.ppv), pct(c.agreement),
    ])));
    fill("comparisons-table", v.comparisons.map((c) => {
      const tr = row([el("td", c.study, "key"), c.concept, c.image_model, c.note_model, c.ai,
        c.report, el("td", c.outcome, "outcome-" + c.outcome), when(c.reported_at)]);
      tr.dataset.study = c.study;
      return tr;
    }));
    drawCharts(v);
    return v.generated_at;
  },
};

// --- charts (Chart.js, shipped with the gateway) ----------------------------------------

const COLOURS = ["#24364b", "#1b7f3b", "#b3261e", "#8a6d00", "#5b4b8a", "#00798c"];

function chart(id, config) {
  if (typeof Chart === "undefined") return;
  if (charts[id]) charts[id].destroy();
  config.options = { animation: false, responsive: false, ...config.options };
  charts[id] = new Chart(document.getElementById(id), config);
}

function drawCharts(v) {
  const months = [...new Set(v.prevalence.map((p) => p.month))].sort();
  const series = [...new Set(v.prevalence.map((p) => `${p.model} ${p.version} ${p.modality}`))];
  chart("chart-prevalence", {
    type: "bar",
    data: {
      labels: months,
      datasets: series.map((name, i) => ({
        label: name,
        backgroundColor: COLOURS[i % COLOURS.length],
        data: months.map((m) => {
          const p = v.prevalence.find((q) => q.month === m && `${q.model} ${q.version} ${q.modality}` === name);
          return p ? p.rate * 100 : null;
        }),
      })),
    },
    options: { scales: { y: { min: 0, max: 100, title: { display: true, text: "% of runs positive" } } } },
  });
  const edges = v.histograms.length ? v.histograms[0].edges : [];
  chart("chart-histogram", {
    type: "bar",
    data: {
      labels: edges.slice(0, -1).map((e, i) => `${e.toFixed(1)}–${edges[i + 1].toFixed(1)}`),
      datasets: v.histograms.map((h, i) => ({
        label: `${h.model} ${h.version}`, backgroundColor: COLOURS[i % COLOURS.length], data: h.counts,
      })),
    },
    options: { scales: { y: { beginAtZero: true, title: { display: true, text: "findings" } } } },
  });
  const labels = v.concordance.map((c) => `${c.image_model} ${c.image_version}: ${c.concept}`);
  const measure = (name, i) => ({
    label: name,
    backgroundColor: COLOURS[i],
    data: v.concordance.map((c) => {
      const p = c[name];
      return p.value === null ? null : [p.low * 100, p.high * 100];
    }),
  });
  chart("chart-concordance", {
    type: "bar",
    data: { labels, datasets: [measure("sensitivity", 0), measure("ppv", 1), measure("agreement", 2)] },
    options: { scales: { y: { min: 0, max: 100, title: { display: true, text: "%" } } } },
  });
}

// --- actions -------------------------------------------------------------------------------

async function replay(id, button) {
  button.disabled = true;
  try {
    await api(`/api/dead/${id}/replay`, { method: "POST" });
  } catch (e) {
    button.disabled = false;
    return;
  }
  refresh();
}

// --- the page ------------------------------------------------------------------------------

async function refresh() {
  clearTimeout(timer);
  try {
    const at = await VIEWS[current]();
    document.getElementById("updated").textContent = "updated " + when(at);
  } catch (e) {
    document.getElementById("updated").textContent = "not updated: " + e.message;
  }
  if (document.visibilityState !== "hidden" && me) timer = setTimeout(refresh, REFRESH_MS);
}

function show(view) {
  current = view;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === view);
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== "view-" + view;
  location.hash = view;
  refresh();
}

function showLogin(message) {
  me = null;
  clearTimeout(timer);
  document.getElementById("login").hidden = false;
  document.getElementById("tabs").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  for (const s of document.querySelectorAll(".view")) s.hidden = true;
  document.getElementById("login-error").textContent = message || "";
}

async function start() {
  try {
    me = await api("/api/whoami");
  } catch (e) {
    if (e.message !== "401") showLogin("The gateway did not answer: " + e.message);
    return;
  }
  document.getElementById("login").hidden = true;
  document.getElementById("tabs").hidden = false;
  document.getElementById("logout").hidden = false;
  document.getElementById("who").textContent = `${me.name} (${me.role})`;
  const wanted = location.hash.slice(1);
  show(VIEWS[wanted] ? wanted : "queue");
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("token");
    sessionStorage.setItem(KEY, input.value.trim());
    input.value = "";
    start();
  });
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    showLogin("Logged out.");
  });
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.view));
  document.addEventListener("visibilitychange", () => { if (document.visibilityState === "visible" && me) refresh(); });
  if (token()) start(); else showLogin("");
});
