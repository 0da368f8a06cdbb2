// metroline's page: dashboard (from /metrics), chat playground (SSE), agent run traces.
// Plain browser JavaScript, no build step. The API key (when the server wants one) is kept in
// sessionStorage and sent as a bearer token on every call.
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = sessionStorage.getItem("metroline-key") || "";

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (apiKey) h["Authorization"] = "Bearer " + apiKey;
  return h;
}

async function api(path, options) {
  const r = await fetch(path, Object.assign({}, options || {}, {headers: headers((options || {}).headers)}));
  if (r.status === 401) {
    $("keystatus").textContent = "refused: wrong or missing API key";
    $("keystatus").dataset.state = "refused";
    throw new Error("401");
  }
  return r;
}

// ------------------------------------------------------------------ tabs and key

document.querySelectorAll(".tab").forEach((b) => b.addEventListener("click", () => {
  document.querySelectorAll(".tab").forEach((x) => x.classList.toggle("active", x === b));
  document.querySelectorAll(".panel").forEach((p) => p.classList.toggle("active", p.id === b.dataset.tab));
  if (b.dataset.tab === "runs") loadRuns();
}));

$("keyform").addEventListener("submit", async (e) => {
  e.preventDefault();
  apiKey = $("apikey").value.trim();
  sessionStorage.setItem("metroline-key", apiKey);
  $("keystatus").textContent = "";
  $("keystatus").dataset.state = "";
  await checkKey();
});

async function checkKey() {
  try {
    const r = await api("/v1/models");
    const models = await r.json();
    $("model").textContent = models.data.map((m) => m.id).join(", ");
    $("keystatus").textContent = apiKey ? "key accepted" : "";
    $("keystatus").dataset.state = "ok";
    return true;
  } catch (e) {
    return false;
  }
}

// ------------------------------------------------------------------ /metrics

function parseMetrics(text) {
  // {name: [{labels: {...}, value}]}
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})? ([^ ]+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) for (const kv of m[3].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[kv[1]] = kv[2];
    (out[m[1]] = out[m[1]] || []).push({labels, value: parseFloat(m[4])});
  }
  return out;
}

const one = (ms, name) => (ms[name] || []).reduce((s, x) => s + x.value, 0);

function quantile(ms, base, q, prev) {
  // A histogram's q-quantile over what was observed since `prev` (or since start), in seconds.
  const buckets = (ms[base + "_bucket"] || []).map((b) => ({le: parseFloat(b.labels.le), n: b.value}));
  if (!buckets.length) return null;
  buckets.sort((a, b) => a.le - b.le);
  const before = prev ? prev[base] || [] : [];
  const counts = buckets.map((b, i) => b.n - (before[i] ? before[i].n : 0));
  const total = counts[counts.length - 1];
  if (!(total > 0)) return null;
  const target = q * total;
  let lo = 0, below = 0;
  for (let i = 0; i < buckets.length; i++) {
    if (counts[i] >= target) {
      const hi = buckets[i].le === Infinity ? lo : buckets[i].le;
      const inB = counts[i] - below;
      return inB > 0 ? lo + (hi - lo) * (target - below) / inB : hi;
    }
    lo = buckets[i].le; below = counts[i];
  }
  return lo;
}

function histState(ms, base) {
  return (ms[base + "_bucket"] || []).map((b) => ({le: parseFloat(b.labels.le), n: b.value}))
    .sort((a, b) => a.le - b.le);
}

const series = {running: [], waiting: [], toks: [], kv: [], hit: [], ttft: [], tpot: []};
window.metrolineSeries = series;  // what the charts draw (read by the browser tests)
const MAXPTS = 90;
let last = null;
let roofline = null;

function push(name, v) {
  series[name].push(v);
  if (series[name].length > MAXPTS) series[name].shift();
}

function draw(id, lines, colors) {
  const c = $(id), g = c.getContext("2d");
  const w = c.width, h = c.height;
  g.clearRect(0, 0, w, h);
  const all = lines.flat().filter((v) => v != null && isFinite(v));
  const top = Math.max(1e-9, ...all, 0) * 1.15 || 1;
  g.strokeStyle = "#e5e7eb"; g.fillStyle = "#6b7280"; g.font = "10px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = h - 14 - (h - 24) * i / 4;
    g.beginPath(); g.moveTo(30, y); g.lineTo(w, y); g.stroke();
    g.fillText((top * i / 4).toPrecision(3), 0, y + 3);
  }
  lines.forEach((pts, k) => {
    g.strokeStyle = colors[k]; g.lineWidth = 2; g.beginPath();
    let started = false;
    pts.forEach((v, i) => {
      if (v == null || !isFinite(v)) return;
      const x = 30 + (w - 32) * i / (MAXPTS - 1), y = h - 14 - (h - 24) * v / top;
      if (!started) { g.moveTo(x, y); started = true; } else g.lineTo(x, y);
    });
    g.stroke();
  });
}

const fmt = (v, digits, unit) => (v == null || !isFinite(v)) ? "-" : v.toFixed(digits) + (unit || "");

async function loadRoofline() {
  try { roofline = await (await api("/v1/metroline/roofline")).json(); } catch (e) { roofline = null; }
}

async function tick() {
  let text;
  try {
    const r = await api("/metrics");
    if (!r.ok) throw new Error(String(r.status));
    text = await r.text();
  } catch (e) {
    $("updated").textContent = "cannot read /metrics: " + e.message;
    return;
  }
  const ms = parseMetrics(text), now = performance.now() / 1000;
  const cur = {t: now, gen: one(ms, "metroline_generation_tokens_total"),
               hits: one(ms, "metroline_prefix_cache_hits_total"), queries: one(ms, "metroline_prefix_cache_queries_total"),
               metroline_time_to_first_token_seconds: histState(ms, "metroline_time_to_first_token_seconds"),
               metroline_time_per_output_token_seconds: histState(ms, "metroline_time_per_output_token_seconds")};
  const running = one(ms, "metroline_num_requests_running"), waiting = one(ms, "metroline_num_requests_waiting");
  const kv = 100 * one(ms, "metroline_kv_cache_usage_perc");
  let toks = null, hit = null;
  if (last) {
    const dt = now - last.t;
    toks = dt > 0 ? (cur.gen - last.gen) / dt : null;
    const dq = cur.queries - last.queries;
    hit = dq > 0 ? 100 * (cur.hits - last.hits) / dq : null;
  }
  const allHit = cur.queries > 0 ? 100 * cur.hits / cur.queries : null;
  const ttft50 = quantile(ms, "metroline_time_to_first_token_seconds", 0.5), ttft90 = quantile(ms, "metroline_time_to_first_token_seconds", 0.9);
  const tpot50 = quantile(ms, "metroline_time_per_output_token_seconds", 0.5), tpot90 = quantile(ms, "metroline_time_per_output_token_seconds", 0.9);
  const spec = one(ms, "metroline_spec_decode_acceptance_rate"), drafted = one(ms, "metroline_spec_decode_num_draft_tokens_total");
  push("running", running); push("waiting", waiting); push("toks", toks); push("kv", kv);
  push("hit", hit); push("ttft", ttft50 == null ? null : 1000 * ttft50); push("tpot", tpot50 == null ? null : 1000 * tpot50);
  $("v-queue").textContent = running + " / " + waiting;
  $("v-toks").textContent = fmt(toks, 1);
  $("v-kv").textContent = fmt(kv, 1, "%");
  $("v-hit").textContent = fmt(allHit, 1, "%");
  $("v-ttft").textContent = ttft50 == null ? "-" : fmt(1000 * ttft50, 0) + " / " + fmt(1000 * ttft90, 0) + " ms";
  $("v-tpot").textContent = tpot50 == null ? "-" : fmt(1000 * tpot50, 1) + " / " + fmt(1000 * tpot90, 1) + " ms";
  $("v-spec").textContent = drafted > 0 ? fmt(100 * spec, 1, "%") : "off";
  if (roofline && roofline.decode_ceiling_tok_s && tpot50) {
    const stream = 1 / tpot50;
    $("v-roof").textContent = fmt(stream, 0) + " of " + fmt(roofline.decode_ceiling_tok_s, 0) + " tok/s (" +
      fmt(100 * stream / roofline.decode_ceiling_tok_s, 0, "%") + ")";
  }
  draw("c-queue", [series.running, series.waiting], ["#2563eb", "#f59e0b"]);
  draw("c-toks", [series.toks], ["#2563eb"]);
  draw("c-kv", [series.kv, series.hit], ["#2563eb", "#f59e0b"]);
  draw("c-lat", [series.ttft, series.tpot], ["#2563eb", "#f59e0b"]);
  $("updated").textContent = "updated " + new Date().toLocaleTimeString() + " (every 1 s)";
  $("updated").dataset.ticks = String(Number($("updated").dataset.ticks || 0) + 1);
  last = cur;
}

// ------------------------------------------------------------------ playground

const history = [];

$("p-mode").addEventListener("change", () => {
  $("l-schema").classList.toggle("hidden", $("p-mode").value !== "json");
  $("l-tools").classList.toggle("hidden", $("p-mode").value !== "tools");
});
$("clear").addEventListener("click", () => { history.length = 0; $("messages").innerHTML = ""; $("usage").textContent = ""; });

function addMsg(role, text) {
  const d = document.createElement("div");
  d.className = "msg " + role;
  d.textContent = text;
  $("messages").appendChild(d);
  $("messages").scrollTop = $("messages").scrollHeight;
  return d;
}

$("chatform").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text) return;
  $("prompt").value = "";
  history.push({role: "user", content: text});
  addMsg("user", text);
  const body = {messages: [], stream: true, stream_options: {include_usage: true},
                temperature: parseFloat($("p-temperature").value), top_p: parseFloat($("p-top_p").value),
                max_tokens: parseInt($("p-max_tokens").value, 10)};
  if ($("p-system").value.trim()) body.messages.push({role: "system", content: $("p-system").value.trim()});
  body.messages.push(...history);
  if ($("p-seed").value) body.seed = parseInt($("p-seed").value, 10);
  const out = addMsg("assistant", "");
  try {
    if ($("p-mode").value === "json")
      body.response_format = {type: "json_schema", json_schema: {name: "answer", schema: JSON.parse($("p-schema").value)}};
    if ($("p-mode").value === "tools") body.tools = JSON.parse($("p-tools").value);
  } catch (err) {
    out.classList.add("error"); out.textContent = "not valid JSON: " + err.message; return;
  }
  $("send").disabled = true;
  let reply = "", calls = {};
  try {
    const r = await api("/v1/chat/completions", {method: "POST", body: JSON.stringify(body),
                                                 headers: {"Content-Type": "application/json"}});
    if (!r.ok) {
      const err = await r.json().catch(() => ({error: {message: r.statusText}}));
      throw new Error(r.status + ": " + err.error.message);
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, i); buf = buf.slice(i + 2);
        const data = ev.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) $("usage").textContent = `${chunk.usage.prompt_tokens} prompt tokens ` +
          `(${(chunk.usage.prompt_tokens_details || {}).cached_tokens || 0} cached), ${chunk.usage.completion_tokens} generated`;
        for (const c of chunk.choices || []) {
          if (c.delta.content) reply += c.delta.content;
          for (const t of c.delta.tool_calls || []) {
            const k = t.index;
            calls[k] = calls[k] || {name: "", arguments: ""};
            if (t.function && t.function.name) calls[k].name += t.function.name;
            if (t.function && t.function.arguments) calls[k].arguments += t.function.arguments;
          }
        }
        const callText = Object.values(calls).map((c) => `[tool call] ${c.name}(${c.arguments})`).join("\n");
        out.textContent = reply + (callText ? (reply ? "\n" : "") + callText : "");
      }
    }
    history.push({role: "assistant", content: reply});
    out.dataset.done = "1";
  } catch (err) {
    out.classList.add("error");
    out.textContent = (reply ? reply + "\n" : "") + "error: " + err.message;
  } finally {
    $("send").disabled = false;
  }
});

// ------------------------------------------------------------------ agent runs

async function loadRuns() {
  let runs;
  try { runs = (await (await api("/v1/agents/runs")).json()).data || []; } catch (e) { return; }
  const ul = $("runlist");
  ul.innerHTML = "";
  for (const run of runs) {
    const li = document.createElement("li");
    li.dataset.id = run.id;
    li.innerHTML = `<span class="status ${run.status}"></span> <b></b><br><span class="muted"></span>`;
    li.querySelector(".status").textContent = run.status;
    li.querySelector("b").textContent = run.id;
    li.querySelector(".muted").textContent = run.task.slice(0, 80);
    li.addEventListener("click", () => showRun(run.id));
    ul.appendChild(li);
  }
  if (!runs.length) ul.innerHTML = '<li class="muted">no runs yet (POST /v1/agents/runs)</li>';
}
$("refresh-runs").addEventListener("click", loadRuns);

function describe(e) {
  if (e.kind === "model_call") {
    const calls = (e.tool_calls || []).map((c) => `${c.name}(${JSON.stringify(c.arguments)})`).join(", ");
    return `step ${e.step}: ${calls ? "calls " + calls : JSON.stringify(e.content)} ` +
           `(${e.input_tokens} in, ${e.output_tokens} out)`;
  }
  if (e.kind === "tool_finished") return `${e.name} -> ${e.ok ? "" : "failed: "}${e.content ?? e.error ?? ""}` +
    (e.duration_s != null ? ` (${(1000 * e.duration_s).toFixed(0)} ms)` : "");
  if (e.kind === "tool_started") return `${e.name}(${JSON.stringify(e.arguments)})`;
  if (e.kind === "guard") return `${e.guard}: ${e.action} (${e.reason})`;
  if (e.kind === "final") return String(e.content ?? "") + (e.ended_by ? ` [ended by ${e.ended_by}: ${e.reason}]` : "");
  const rest = Object.assign({}, e); delete rest.seq; delete rest.kind; delete rest.ts;
  return JSON.stringify(rest);
}

async function showRun(id) {
  const run = await (await api("/v1/agents/runs/" + encodeURIComponent(id))).json();
  const box = $("trace");
  box.innerHTML = "";
  const h = document.createElement("h3");
  h.textContent = `${run.id}: ${run.status}` + (run.ended_by ? ` (${run.ended_by})` : "");
  box.appendChild(h);
  const task = document.createElement("p"); task.textContent = run.task; box.appendChild(task);
  const events = run.events || [];
  const t0 = events.length ? events[0].ts - (events[0].duration_s || 0) : 0;
  const t1 = events.length ? events[events.length - 1].ts : 1;
  const span = Math.max(1e-3, t1 - t0);
  const tl = document.createElement("div"); tl.className = "timeline"; tl.id = "timeline";
  for (const e of events) {
    const row = document.createElement("div"); row.className = "ev"; row.dataset.kind = e.kind;
    const left = document.createElement("div");
    left.innerHTML = `<b></b><br><span class="muted"></span>`;
    left.querySelector("b").textContent = e.kind;
    left.querySelector(".muted").textContent = "+" + (e.ts - t0).toFixed(2) + " s";
    const right = document.createElement("div");
    const bar = document.createElement("div");
    bar.className = "bar " + (e.kind.startsWith("tool") ? "tool" : e.kind === "guard" ? "guard" : e.kind === "final" ? "final" : "");
    const dur = e.duration_s || 0;
    bar.style.marginLeft = (100 * (e.ts - dur - t0) / span).toFixed(2) + "%";
    bar.style.width = Math.max(0.5, 100 * dur / span).toFixed(2) + "%";
    const pre = document.createElement("pre"); pre.textContent = describe(e);
    right.appendChild(bar); right.appendChild(pre);
    row.appendChild(left); row.appendChild(right); tl.appendChild(row);
  }
  box.appendChild(tl);
  if (run.result) { const r = document.createElement("p"); r.innerHTML = "<b>result:</b> "; r.append(String(run.result)); box.appendChild(r); }
}

// ------------------------------------------------------------------ start

(async () => {
  if (apiKey) $("apikey").value = apiKey;
  await checkKey();
  loadRoofline();
  tick();
  setInterval(tick, 1000);
})();
