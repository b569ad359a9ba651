// The AlgoLink console: a few pages over the JSON API (/v1, /v2), rendered here. No framework,
// no build step, nothing fetched from elsewhere. Every change asks for confirmation; the server
// records who made it in the event log.
"use strict";

const ROLES = ["viewer", "predictor", "publisher", "admin"];
const COLORS = ["#2457c5", "#d9480f", "#2b8a3e", "#862e9c", "#c2255c", "#0b7285", "#5c940d", "#e67700"];
const REFRESH_MS = 2000;
const WINDOW = 60; // live samples kept (two minutes at REFRESH_MS)

let me = null; // GET /v1/whoami
let timer = null; // the current page's refresh
let generation = 0; // bumped by every render: an older one still loading starts no refresh

const $ = (selector, root = document) => root.querySelector(selector);
const esc = (v) =>
  String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const path = (name) => name.split("/").map(encodeURIComponent).join("/");
const namespaceOf = (model) => (model.includes("/") ? model.split("/")[0] : "default");

function can(model, role) {
  if (!me || me.auth === "off") return true;
  const ns = namespaceOf(model);
  if (me.scope && me.scope !== ns) return false;
  if (me.owner) return true;
  const have = me.roles && me.roles[ns];
  return !!have && ROLES.indexOf(have) >= ROLES.indexOf(role);
}

function canSomewhere(role) {
  if (!me || me.auth === "off" || me.owner) return true;
  return Object.keys(me.roles || {}).some((ns) => can(ns + "/x", role));
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, url, body) {
  const init = { method, credentials: "same-origin", headers: { "x-algolink-console": "1" } };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["content-type"] = "application/json";
  }
  const r = await fetch(url, init);
  const text = await r.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch (_) {
    data = text;
  }
  if (r.status === 401) {
    location.hash = "#/login";
    throw new ApiError(401, (data && data.error) || "please log in");
  }
  if (!r.ok) throw new ApiError(r.status, (data && data.error) || `${method} ${url}: ${r.status}`);
  return data;
}

function toast(message, error = false) {
  const t = $("#toast");
  t.textContent = message;
  t.className = error ? "error" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), error ? 8000 : 3000);
}

/// Asks, then runs a change; says what happened.
async function act(question, change, done) {
  if (!confirm(question)) return;
  try {
    await change();
    toast(done);
  } catch (e) {
    toast(e.message, true);
  }
  render();
}

const ago = (ms) => {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 129600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
};
const bytes = (n) => {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) (n /= 1024), i++;
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
};
const fixed = (x, digits = 1) => (x == null || !isFinite(x) ? "–" : x.toFixed(digits));
const time = (ms) => new Date(ms).toLocaleString();

// ---- pages ----

async function loginPage(main) {
  main.innerHTML = `<section class="login"><h1>Log in</h1>
    <p class="muted">Paste an AlgoLink token (<code>algolink token create</code>). The console keeps a
    session of its own for 12 hours; logging out ends it.</p>
    <form id="login-form"><input id="token" type="password" autocomplete="off" placeholder="alk_…" required>
    <button class="primary" id="login-submit">Log in</button><p id="login-error" class="error"></p></form></section>`;
  $("#login-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      await api("POST", "/ui/login", { token: $("#token").value });
      await whoami();
      location.hash = "#/";
    } catch (err) {
      $("#login-error").textContent = err.message;
    }
  });
}

function trafficText(traffic) {
  if (!traffic || !traffic.variants) return "–";
  return traffic.variants.map((v) => `v${v.version} ${fixed(v.percent, 0)}%`).join(" · ");
}

async function modelsPage(main) {
  const models = await api("GET", "/v1/models");
  const rows = models
    .map((m) => {
      const states = {};
      for (const v of m.versions) states[v.state] = (states[v.state] || 0) + 1;
      const aliases = Object.entries(m.aliases || {})
        .map(([a, v]) => `<span class="pill">${esc(a)} → ${v}</span>`)
        .join("");
      return `<tr data-model="${esc(m.name)}"><td><a href="#/model/${esc(m.name)}">${esc(m.name)}</a></td>
        <td class="num">${m.serving_version ?? "–"}</td>
        <td>${Object.entries(states).map(([s, n]) => `<span class="state-${s}">${n} ${s}</span>`).join(", ")}</td>
        <td>${aliases}</td><td class="traffic">${esc(trafficText(m.traffic))}</td></tr>`;
    })
    .join("");
  main.innerHTML = `<h1>Models</h1><section><table id="models"><thead><tr><th>Model</th><th class="num">Serving</th>
    <th>Versions</th><th>Aliases</th><th>Traffic</th></tr></thead><tbody>${rows ||
      '<tr><td colspan="5" class="muted">No model yet: push one.</td></tr>'}</tbody></table></section>`;
}

function versionsTable(m) {
  const aliasesOf = {};
  for (const [a, v] of Object.entries(m.aliases || {})) (aliasesOf[v] = aliasesOf[v] || []).push(a);
  const rows = m.versions
    .slice()
    .reverse()
    .map((v) => {
      const retire =
        can(m.name, "publisher") && v.state === "ready"
          ? `<button class="danger retire" data-version="${v.version}">Retire</button>`
          : "";
      return `<tr data-version="${v.version}"><td class="num">${v.version}</td>
        <td class="state-${esc(v.state)}" title="${esc(v.reason)}">${esc(v.state)}</td>
        <td>${esc(v.format)}</td><td class="num">${bytes(v.size)}</td>
        <td class="mono" title="${esc(v.sha256)}">${esc(v.sha256.slice(0, 12))}</td>
        <td title="${esc(time(v.created_at_ms))}">${ago(v.created_at_ms)}</td>
        <td>${(aliasesOf[v.version] || []).map((a) => `<span class="pill">${esc(a)}</span>`).join("")}</td>
        <td>${v.tags.map((t) => `<span class="pill">${esc(t)}</span>`).join("")}</td>
        <td>${esc(v.pushed_by || "–")}</td><td>${retire}</td></tr>`;
    })
    .join("");
  return `<table id="versions"><thead><tr><th class="num">Version</th><th>State</th><th>Format</th>
    <th class="num">Size</th><th>sha256</th><th>Pushed</th><th>Aliases</th><th>Tags</th><th>By</th><th></th></tr>
    </thead><tbody>${rows}</tbody></table>`;
}

function splitForm(name, route, traffic, versions) {
  const variants =
    route && route.variants
      ? route.variants.map((v) => ({ target: String(v.target), weight: v.weight }))
      : (traffic.variants || []).map((v) => ({ target: String(v.version), weight: v.percent }));
  // Every version that can serve may be given a weight (a route loads what it needs).
  const usable = versions.filter((v) => v.state === "ready" || v.state === "unloaded").map((v) => String(v.version));
  for (const v of usable.reverse()) if (!variants.some((x) => x.target === v)) variants.push({ target: v, weight: 0 });
  const rows = variants
    .map(
      (v, i) => `<div class="row variant"><label>Target <input class="target" value="${esc(v.target)}"
        aria-label="target ${i + 1}"></label><label>Weight <input class="weight" type="number" min="0" step="any"
        value="${esc(v.weight)}" aria-label="weight ${i + 1}"></label></div>`,
    )
    .join("");
  return `<form id="split-form">${rows}<div class="row"><button class="primary" id="apply-split">Apply split</button>
    ${route ? '<button type="button" class="danger" id="remove-split">Remove split</button>' : ""}</div></form>`;
}

function trafficNow(traffic) {
  const variants = (traffic.variants || [])
    .map((v) => `<tr data-version="${v.version}"><td>${esc(v.target)}</td><td class="num">${v.version}</td>
      <td class="num percent">${fixed(v.percent, 1)}%</td></tr>`)
    .join("");
  const extra = [];
  if (traffic.shadow) extra.push(`shadow: ${esc(JSON.stringify(traffic.shadow))}`);
  if (traffic.experiment) extra.push(`experiment ${esc(traffic.experiment.id ?? JSON.stringify(traffic.experiment))}`);
  return `<table id="split-now"><thead><tr><th>Variant</th><th class="num">Version</th><th class="num">Share</th></tr>
    </thead><tbody>${variants}</tbody></table>${extra.length ? `<p class="muted">${extra.join(" · ")}</p>` : ""}`;
}

function rolloutSection(name, rollout, versions) {
  const r = rollout.rollout;
  if (r) {
    const buttons = can(name, "publisher")
      ? `<div class="row"><button class="primary" id="promote">Promote v${r.canary}</button>
         <button class="danger" id="rollback">Roll back</button></div>`
      : "";
    return `<p id="rollout-status">Canary <b>v${r.canary}</b> against control v${r.control} at
      <b>${r.weight}%</b> (step ${r.policy.step}% every ${r.policy.interval_s} s, promoted after a step at
      ${r.policy.max_weight}%); started ${ago(r.started_ms)}.</p>${buttons}`;
  }
  if (!can(name, "publisher")) return `<p id="rollout-status" class="muted">No canary.</p>`;
  const options = versions
    .filter((v) => v.state === "ready" || v.state === "unloaded")
    .map((v) => `<option value="${v.version}">v${v.version}</option>`)
    .reverse()
    .join("");
  return `<p id="rollout-status" class="muted">No canary.</p><form class="inline" id="canary-form">
    <label>Canary <select id="canary-version">${options}</select></label>
    <button id="start-canary">Start canary</button></form>`;
}

function ci(interval, digits = 3) {
  return interval && interval[0] != null ? `[${fixed(interval[0], digits)}, ${fixed(interval[1], digits)}]` : "–";
}

function experimentSection(name, report, hasRoute) {
  if (!report) {
    if (!can(name, "publisher") || !hasRoute) return `<p class="muted">No running experiment.</p>`;
    return `<p class="muted">No running experiment.</p><form class="inline" id="experiment-form">
      <label>Goal <select id="experiment-goal"><option>conversion</option><option>reward</option></select></label>
      <button id="start-experiment">Start experiment on this split</button></form>`;
  }
  const rows = report.variants
    .map(
      (v) => `<tr data-version="${v.version}"><td class="num">${v.version}${v.control ? " (control)" : ""}</td>
      <td class="num">${v.requests}</td><td class="num">${v.errors}</td><td class="num">${fixed(v.latency_ms.p99, 2)}</td>
      <td class="num">${v.outcomes}</td><td class="num">${fixed(v.mean, 4)} ${ci(v.mean_interval, 4)}</td>
      <td class="num">${v.control ? "" : `${fixed(v.difference, 4)} ${ci(v.difference_interval, 4)}`}</td>
      <td class="num">${v.control ? "" : fixed(v.p_value, 4)}</td><td class="verdict">${esc(v.verdict || "")}</td></tr>`,
    )
    .join("");
  const buttons = can(name, "publisher")
    ? `<div class="row"><button id="conclude-experiment" class="primary">Conclude (promote the best)</button>
       <button id="stop-experiment" class="danger">Stop</button></div>`
    : "";
  return `<p>Experiment <b>${report.id}</b> (${esc(report.goal)}), started ${ago(report.started_ms)}, alpha
    ${report.test.alpha}${report.alpha_per_comparison !== report.test.alpha ? ` (${fixed(report.alpha_per_comparison, 4)} per comparison)` : ""}.</p>
    <table id="experiment"><thead><tr><th class="num">Version</th><th class="num">Requests</th><th class="num">Errors</th>
    <th class="num">p99 ms</th><th class="num">Outcomes</th><th class="num">Mean [95% CI]</th>
    <th class="num">Difference [always-valid CI]</th><th class="num">p-value</th><th>Verdict</th></tr></thead>
    <tbody>${rows}</tbody></table>${buttons}`;
}

function eventsTable(list, withModel) {
  const rows = list
    .map(
      (e) => `<tr data-kind="${esc(e.kind)}"><td title="${esc(time(e.at_ms))}">${ago(e.at_ms)}</td>
      ${withModel ? `<td><a href="#/model/${esc(e.model)}">${esc(e.model)}</a></td>` : ""}
      <td class="num">${e.version ?? ""}</td><td>${esc(e.kind)}</td><td>${esc(e.message)}</td>
      <td>${esc((e.detail && e.detail.by) || "")}</td></tr>`,
    )
    .join("");
  return `<table class="events"><thead><tr><th>When</th>${withModel ? "<th>Model</th>" : ""}<th class="num">Version</th>
    <th>Kind</th><th>What</th><th>By</th></tr></thead><tbody>${rows ||
      '<tr><td colspan="6" class="muted">Nothing yet.</td></tr>'}</tbody></table>`;
}

async function modelPage(main, name) {
  const base = `/v1/models/${path(name)}`;
  const [m, route, rollout, experiments] = await Promise.all([
    api("GET", base),
    api("GET", `${base}/route`),
    api("GET", `${base}/rollout`),
    api("GET", `/v1/experiments?model=${encodeURIComponent(name)}`),
  ]);
  const running = experiments.find((e) => e.state === "running");
  const report = running ? await api("GET", `/v1/experiments/${running.id}`) : null;
  const publisher = can(name, "publisher");
  main.innerHTML = `<h1>${esc(name)}</h1>
    <section><h2>Versions</h2>${versionsTable(m)}</section>
    <section><h2>Live</h2><table id="live"><thead><tr><th class="num">Version</th><th class="num">req/s</th>
      <th class="num">p50 ms</th><th class="num">p99 ms</th><th class="num">errors %</th><th class="num">mean batch</th>
      <th class="num">queue ms</th><th class="num">queued</th></tr></thead><tbody></tbody></table>
      <div class="charts">${["rps:Requests per second", "latency:Latency p50 / p99 (ms)", "errors:Errors (%)",
        "queue:Mean queue time (ms)", "batch:Batch sizes over the window (rows per batch)"]
        .map((c) => `<div class="chart"><h3>${c.split(":")[1]}</h3><canvas id="chart-${c.split(":")[0]}"></canvas></div>`)
        .join("")}</div></section>
    <section><h2>Traffic</h2><div id="traffic-now">${trafficNow(m.traffic)}</div>
      ${!publisher ? "" : rollout.rollout ? '<p class="muted">The canary rollout steers the traffic: promote or roll it back to set a split.</p>'
        : splitForm(name, route.route, m.traffic, m.versions)}</section>
    <section><h2>Canary rollout</h2>${rolloutSection(name, rollout, m.versions)}</section>
    <section><h2>Experiment</h2><div id="experiment-now">${experimentSection(name, report, !!route.route)}</div></section>
    <section><h2>Events</h2><div id="model-events"></div>
      <p><a href="#/events?model=${encodeURIComponent(name)}">All events of ${esc(name)}</a></p></section>`;

  for (const b of main.querySelectorAll("button.retire")) {
    const v = b.dataset.version;
    b.addEventListener("click", () =>
      act(
        `Retire version ${v} of ${name}? It stops taking traffic and is unloaded (its files are kept).`,
        () => api("PATCH", `${base}/versions/${v}`, { ttl_s: 0 }),
        `Version ${v} retires now.`,
      ),
    );
  }
  const form = $("#split-form");
  if (form) {
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      const variants = [...form.querySelectorAll(".variant")]
        .map((row) => ({ target: $(".target", row).value.trim(), weight: Number($(".weight", row).value) }))
        .filter((v) => v.target && v.weight > 0)
        .map((v) => ({ target: /^\d+$/.test(v.target) ? Number(v.target) : v.target, weight: v.weight }));
      const text = variants.map((v) => `${v.target}: ${v.weight}`).join(", ");
      const body = Object.assign({}, route.route || {}, { variants });
      act(`Route the traffic of ${name} as ${text}?`, () => api("PUT", `${base}/route`, body), `Split set: ${text}.`);
    });
    const remove = $("#remove-split");
    if (remove)
      remove.addEventListener("click", () =>
        act(`Remove the split of ${name}? Its default version takes all traffic.`, () => api("DELETE", `${base}/route`), "Split removed."),
      );
  }
  const r = rollout.rollout;
  if (r && $("#promote")) {
    $("#promote").addEventListener("click", () =>
      act(`Promote canary v${r.canary} of ${name}? It takes all traffic and becomes the champion.`,
        () => api("POST", `${base}/rollout/promote`), `v${r.canary} promoted.`),
    );
    $("#rollback").addEventListener("click", () =>
      act(`Roll back canary v${r.canary} of ${name}? Traffic returns to v${r.control}.`,
        () => api("DELETE", `${base}/rollout`), `v${r.canary} rolled back.`),
    );
  }
  const canary = $("#canary-form");
  if (canary)
    canary.addEventListener("submit", (e) => {
      e.preventDefault();
      const v = $("#canary-version").value;
      act(`Start a canary rollout of v${v} of ${name}?`, () => api("POST", `${base}/rollout`, { canary: Number(v) }), `Canary v${v} started.`);
    });
  const start = $("#experiment-form");
  if (start)
    start.addEventListener("submit", (e) => {
      e.preventDefault();
      const goal = $("#experiment-goal").value;
      act(`Start a ${goal} experiment on the split of ${name}?`, () => api("POST", `${base}/experiments`, { goal }), "Experiment started.");
    });
  if (report && $("#conclude-experiment")) {
    $("#conclude-experiment").addEventListener("click", () =>
      act(`Conclude experiment ${report.id}? The best variant becomes the champion.`,
        () => api("POST", `/v1/experiments/${report.id}/conclude`, {}), "Experiment concluded."),
    );
    $("#stop-experiment").addEventListener("click", () =>
      act(`Stop experiment ${report.id} without a decision?`, () => api("POST", `/v1/experiments/${report.id}/stop`), "Experiment stopped."),
    );
  }

  const samples = [];
  const refresh = async () => {
    const [live, fresh, events] = await Promise.all([
      api("GET", `${base}/live`),
      api("GET", base),
      api("GET", `/v1/events?model=${encodeURIComponent(name)}&order=newest&limit=15`),
    ]);
    samples.push(live);
    if (samples.length > WINDOW) samples.shift();
    drawLive(samples);
    $("#traffic-now").innerHTML = trafficNow(fresh.traffic);
    $("#model-events").innerHTML = eventsTable(events, false);
  };
  await refresh();
  return refresh;
}

async function eventsPage(main, params) {
  const model = params.get("model") || "";
  const models = await api("GET", "/v1/models");
  const options = ['<option value="">all models</option>']
    .concat(models.map((m) => `<option${m.name === model ? " selected" : ""}>${esc(m.name)}</option>`))
    .join("");
  main.innerHTML = `<h1>Events</h1><section><div class="row"><label>Model
    <select id="event-model">${options}</select></label></div><div id="event-list"></div></section>`;
  $("#event-model").addEventListener("change", (e) => {
    location.hash = e.target.value ? `#/events?model=${encodeURIComponent(e.target.value)}` : "#/events";
  });
  const refresh = async () => {
    const q = model ? `&model=${encodeURIComponent(model)}` : "";
    $("#event-list").innerHTML = eventsTable(await api("GET", `/v1/events?order=newest&limit=200${q}`), true);
  };
  await refresh();
  return refresh;
}

async function pushPage(main) {
  main.innerHTML = `<h1>Push a model</h1><section><form id="push-form">
    <div class="row"><label>Name <input id="push-name" required placeholder="team/fraud"></label></div>
    <div class="row"><label>File <input id="push-file" type="file" required
      accept=".onnx,.safetensors,.tar"></label></div>
    <p class="muted">ONNX, safetensors (with its config in the metadata), or a tar of a model directory.</p>
    <div class="row"><button class="primary" id="push-submit">Push</button>
      <progress id="push-progress" max="1" value="0" hidden></progress><span id="push-percent"></span></div>
    <p id="push-result"></p></form></section>`;
  $("#push-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = $("#push-name").value.trim();
    const file = $("#push-file").files[0];
    if (!name || !file) return;
    const xhr = new XMLHttpRequest();
    const progress = $("#push-progress");
    progress.hidden = false;
    $("#push-submit").disabled = true;
    xhr.upload.addEventListener("progress", (p) => {
      if (!p.lengthComputable) return;
      progress.value = p.loaded / p.total;
      $("#push-percent").textContent = `${Math.round((100 * p.loaded) / p.total)}% of ${bytes(p.total)}`;
    });
    xhr.addEventListener("loadend", () => {
      $("#push-submit").disabled = false;
      let answer = {};
      try {
        answer = JSON.parse(xhr.responseText);
      } catch (_) {}
      const out = $("#push-result");
      if (xhr.status >= 200 && xhr.status < 300) {
        progress.value = 1;
        out.className = "";
        out.innerHTML = `Pushed <a href="#/model/${esc(answer.name)}">${esc(answer.name)}</a> version
          <b>${answer.version}</b> (${esc(answer.state)}), sha256 <code>${esc(answer.sha256)}</code>.`;
      } else {
        out.className = "error";
        out.textContent = answer.error || `push failed (${xhr.status || "no answer"})`;
      }
    });
    xhr.open("POST", `/v1/models/${path(name)}/versions`);
    xhr.setRequestHeader("x-algolink-console", "1");
    xhr.send(file);
  });
}

// ---- live charts: differences between cumulative readings, as Prometheus' rate() ----

/// The q-quantile of the observations that fell between two readings of a histogram.
function quantile(q, now, before) {
  const count = now.count - (before ? before.count : 0);
  if (count <= 0) return null;
  const cum = now.cumulative.map((c, i) => c - (before ? before.cumulative[i] : 0));
  const target = q * count;
  for (let i = 0; i < cum.length; i++) {
    if (cum[i] >= target) {
      const lower = i ? now.le[i - 1] : 0;
      const below = i ? cum[i - 1] : 0;
      const inBucket = cum[i] - below;
      return lower + (now.le[i] - lower) * (inBucket ? (target - below) / inBucket : 1);
    }
  }
  return now.le[now.le.length - 1];
}

function derive(prev, now) {
  const dt = (now.at_ms - prev.at_ms) / 1000;
  const out = {};
  for (const v of now.versions) {
    const p = prev.versions.find((x) => x.version === v.version);
    if (!p || dt <= 0) continue;
    const done = v.success + v.failure - (p.success + p.failure);
    // Counters only grow, unless the version was reloaded or the server restarted: no rate then.
    if (done < 0 || v.failure < p.failure || v.batch_size.count < p.batch_size.count) continue;
    const batches = v.batch_size.count - p.batch_size.count;
    const queued = v.queue_seconds.count - p.queue_seconds.count;
    const ms = (q) => {
      const s = quantile(q, v.request_seconds, p.request_seconds);
      return s == null ? null : 1000 * s;
    };
    out[v.version] = {
      rps: done / dt,
      p50: ms(0.5),
      p99: ms(0.99),
      errors: done ? (100 * (v.failure - p.failure)) / done : 0,
      batch: batches ? (v.batch_size.sum - p.batch_size.sum) / batches : null,
      queue: queued ? (1000 * (v.queue_seconds.sum - p.queue_seconds.sum)) / queued : null,
      depth: v.queue_depth,
    };
  }
  return out;
}

function drawLive(samples) {
  if (!$("#live")) return;
  const series = [];
  for (let i = 1; i < samples.length; i++) series.push({ t: samples[i].at_ms, by: derive(samples[i - 1], samples[i]) });
  const versions = [...new Set(samples[samples.length - 1].versions.map((v) => v.version))].sort((a, b) => a - b);
  const color = (v) => COLORS[v % COLORS.length];
  const last = series.length ? series[series.length - 1].by : {};
  $("#live tbody").innerHTML = versions
    .map((v) => {
      const d = last[v] || {};
      return `<tr data-version="${v}"><td class="num">${v}</td><td class="num rps">${fixed(d.rps, 1)}</td>
        <td class="num">${fixed(d.p50, 2)}</td><td class="num">${fixed(d.p99, 2)}</td>
        <td class="num">${fixed(d.errors, 1)}</td><td class="num">${fixed(d.batch, 1)}</td>
        <td class="num">${fixed(d.queue, 2)}</td><td class="num">${d.depth ?? "–"}</td></tr>`;
    })
    .join("");
  const line = (field, dash) =>
    versions.map((v) => ({ label: `v${v}`, color: color(v), dash, points: series.map((s) => [s.t, s.by[v] ? s.by[v][field] : null]) }));
  // The time axis ends at the newest reading, on the server's clock (the browser's may differ).
  const end = samples[samples.length - 1].at_ms;
  lineChart($("#chart-rps"), end, line("rps"));
  lineChart($("#chart-latency"), end, line("p50").concat(line("p99", [4, 3]).map((s) => ({ ...s, label: `${s.label} p99` }))));
  lineChart($("#chart-errors"), end, line("errors"));
  lineChart($("#chart-queue"), end, line("queue"));
  // Batch sizes: executed batches per bucket between the oldest and newest reading.
  const first = samples[0];
  const now = samples[samples.length - 1];
  const bars = versions.map((v) => {
    const a = first.versions.find((x) => x.version === v);
    const b = now.versions.find((x) => x.version === v);
    const cum = b.batch_size.cumulative.map((c, i) => c - (a ? a.batch_size.cumulative[i] : 0));
    return { label: `v${v}`, color: color(v), counts: cum.map((c, i) => c - (i ? cum[i - 1] : 0)) };
  });
  barChart($("#chart-batch"), now.versions.length ? now.versions[0].batch_size.le : [], bars);
}

function canvas2d(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth;
  const h = canvas.clientHeight;
  canvas.width = w * ratio;
  canvas.height = h * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.font = "11px system-ui, sans-serif";
  return { g, w, h };
}

function legend(g, w, items) {
  let x = w - 8;
  g.textAlign = "right";
  for (const s of items.slice().reverse()) {
    g.fillStyle = s.color;
    g.fillText(s.label, x, 12);
    x -= g.measureText(s.label).width + 10;
  }
}

function lineChart(canvas, now, series) {
  const { g, w, h } = canvas2d(canvas);
  const pad = { l: 42, r: 8, t: 18, b: 16 };
  const all = series.flatMap((s) => s.points).filter((p) => p[1] != null);
  const t0 = now - WINDOW * REFRESH_MS;
  const top = Math.max(0, ...all.map((p) => p[1]));
  const max = top > 0 ? top * 1.15 : 1;
  const x = (t) => pad.l + ((t - t0) / (now - t0)) * (w - pad.l - pad.r);
  const y = (v) => h - pad.b - (v / max) * (h - pad.t - pad.b);
  g.strokeStyle = "#e3e6ec";
  g.fillStyle = "#6b7280";
  g.textAlign = "right";
  for (const f of [0, 0.5, 1]) {
    const v = f * max;
    g.beginPath();
    g.moveTo(pad.l, y(v));
    g.lineTo(w - pad.r, y(v));
    g.stroke();
    g.fillText(v >= 100 ? v.toFixed(0) : v.toPrecision(2), pad.l - 4, y(v) + 4);
  }
  g.textAlign = "left";
  g.fillText(`last ${(WINDOW * REFRESH_MS) / 1000} s`, pad.l, h - 3);
  for (const s of series) {
    g.strokeStyle = s.color;
    g.lineWidth = 1.6;
    g.setLineDash(s.dash || []);
    g.beginPath();
    let pen = false;
    for (const [t, v] of s.points) {
      if (v == null) {
        pen = false;
        continue;
      }
      pen ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v));
      pen = true;
    }
    g.stroke();
    g.fillStyle = s.color;
    for (const [t, v] of s.points) if (v != null && !s.dash) g.fillRect(x(t) - 1.5, y(v) - 1.5, 3, 3);
  }
  g.setLineDash([]);
  legend(g, w, series.filter((s) => !s.dash));
}

function barChart(canvas, bounds, bars) {
  const { g, w, h } = canvas2d(canvas);
  const pad = { l: 42, r: 8, t: 18, b: 16 };
  const used = bounds.map((_, i) => bars.some((b) => b.counts[i] > 0));
  const first = used.indexOf(true);
  const lastUsed = used.lastIndexOf(true);
  g.fillStyle = "#6b7280";
  if (first < 0) {
    g.fillText("no batch in the window", pad.l, h / 2);
    return;
  }
  const idx = [];
  for (let i = first; i <= lastUsed; i++) idx.push(i);
  const max = Math.max(1, ...bars.flatMap((b) => idx.map((i) => b.counts[i])));
  const slot = (w - pad.l - pad.r) / idx.length;
  const bw = Math.max(2, (slot - 6) / bars.length);
  g.textAlign = "center";
  idx.forEach((i, k) => {
    bars.forEach((b, j) => {
      const v = b.counts[i];
      const bh = (v / max) * (h - pad.t - pad.b);
      g.fillStyle = b.color;
      g.fillRect(pad.l + k * slot + 3 + j * bw, h - pad.b - bh, bw - 1, bh);
    });
    g.fillStyle = "#6b7280";
    g.fillText(`≤${bounds[i]}`, pad.l + k * slot + slot / 2, h - 3);
  });
  g.textAlign = "right";
  g.fillText(String(max), pad.l - 4, pad.t + 4);
  legend(g, w, bars);
}

// ---- navigation ----

async function whoami() {
  try {
    me = await api("GET", "/v1/whoami");
  } catch (e) {
    me = null;
  }
  const who = $("#who");
  if (me && me.user) {
    const roles = me.owner ? "owner" : Object.entries(me.roles || {}).map(([ns, r]) => `${r} in ${ns}`).join(", ");
    who.textContent = `${me.user}${roles ? ` (${roles})` : ""}`;
  } else {
    who.textContent = me && me.auth === "off" ? "auth off" : "";
  }
  $("#logout").hidden = !(me && me.user);
  $("#nav-push").hidden = !canSomewhere("publisher");
}

async function render() {
  const mine = ++generation;
  clearInterval(timer);
  timer = null;
  const main = $("#main");
  const [route, query] = location.hash.replace(/^#/, "").split("?");
  const params = new URLSearchParams(query || "");
  try {
    if (route === "/login") return loginPage(main);
    if (!me) await whoami();
    if (!me) return;
    let refresh = null;
    if (route.startsWith("/model/")) {
      const name = decodeURIComponent(route.slice(7));
      if (name.split("/").some((part) => part === "" || part === "." || part === "..")) {
        throw new ApiError(400, `no model is called ${JSON.stringify(name)}`);
      }
      refresh = await modelPage(main, name);
    }
    else if (route === "/events") refresh = await eventsPage(main, params);
    else if (route === "/push") await pushPage(main);
    else await modelsPage(main);
    if (refresh && mine === generation) {
      timer = setInterval(() => refresh().catch((e) => mine === generation && toast(e.message, true)), REFRESH_MS);
    }
  } catch (e) {
    if (e.status !== 401) main.innerHTML = `<p class="error">${esc(e.message)}</p>`;
  }
}

window.addEventListener("hashchange", async () => {
  if (location.hash !== "#/login" && me === null) await whoami();
  render();
});
$("#logout").addEventListener("click", async () => {
  await fetch("/ui/logout", { method: "POST", credentials: "same-origin", headers: { "x-algolink-console": "1" } });
  me = null;
  await whoami();
  location.hash = "#/login";
});
whoami().then(render);
