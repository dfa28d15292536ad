// cryptopi dashboard: one card per product, one chart per horizon (the `granularity` every event carries).
// /api/stream gives a snapshot (recent candles and the predictions made over them), then live candles and
// each new prediction; /api/candles and /api/accuracy are read again when a candle closes; /health is
// polled for what is wrong. Plain JS and the vendored uPlot: no build step, no framework.
"use strict";

const MIN_SCORED = 24;  // fewer realized predictions than this are too few to judge a model by: muted
const CHART_CANDLES = 48;
const COLORS = {cnn: "#f0883e", lasso: "#58a6ff", persistence: "#a371f7"};
const SPARE = ["#3fb950", "#db61a2", "#e3b341", "#39c5cf"];
const hidden = new Set(JSON.parse(localStorage.getItem("cryptopi.hidden") || "[]"));  // models toggled off
const products = new Map();  // product -> card state; window.cryptopi for tests and curious people
window.cryptopi = products;

const fmt = (x, d = 2) => x == null ? "—" : x.toLocaleString("en-US", {minimumFractionDigits: d, maximumFractionDigits: d});
const pct = x => x == null ? "—" : (x >= 0 ? "+" : "") + (100 * x).toFixed(2) + " %";
const secs = iso => Date.parse(iso) / 1000;
const utc = t => new Date(t * 1000).toISOString().slice(11, 16) + " UTC";
const color = (model, models) => COLORS[model] || SPARE[models.indexOf(model) % SPARE.length];

function horizonName(g) {
  if (g % 86400 === 0) return g === 86400 ? "next day" : `next ${g / 86400} days`;
  if (g % 3600 === 0) return g === 3600 ? "next hour" : `next ${g / 3600} hours`;
  return `next ${g / 60} minutes`;
}

function card(product) {
  let c = products.get(product);
  if (c) return c;
  const node = document.getElementById("product-card").content.firstElementChild.cloneNode(true);
  node.dataset.product = product;
  node.querySelector(".product").textContent = product;
  node.querySelector(".unit").textContent = product.split("-").pop();  // the quote currency: BTC-EUR is in EUR
  document.getElementById("products").appendChild(node);
  c = {product, node, live: null, lastData: null, horizons: new Map()};
  products.set(product, c);
  return c;
}

function horizon(c, g) {
  let h = c.horizons.get(g);
  if (h) return h;
  const node = document.getElementById("horizon").content.firstElementChild.cloneNode(true);
  node.dataset.granularity = g;
  node.querySelector(".title").textContent = horizonName(g);
  const after = [...c.horizons.keys()].filter(k => k < g).sort((a, b) => b - a)[0];  // the hour first
  c.node.querySelector(".horizons").insertBefore(node, after ? c.horizons.get(after).node : null);
  h = {g, node, candles: new Map(), open: null, predictions: new Map(), accuracy: {}, chart: null, layout: ""};
  c.horizons.set(g, h);
  new ResizeObserver(() => resize(h)).observe(node.querySelector(".chart"));
  return h;
}

// -- data in ----------------------------------------------------------------------------------------

function keepCandles(h, candles) {
  h.candles = new Map(candles.slice(-CHART_CANDLES).map(k => [secs(k.time), k]));
  if (h.open && h.candles.has(secs(h.open.time))) h.open = null;  // closed since: the stored one counts
}

function keepPrediction(h, p) {
  h.predictions.set(`${p.model}@${p.target_time}`, p);
  if (!h.candles.size) return;
  const first = Math.min(...h.candles.keys());  // forget what fell off the chart's left edge
  for (const [key, q] of h.predictions) if (secs(q.target_time) <= first) h.predictions.delete(key);
}

function onEvent(event) {
  if (event.type === "snapshot") {
    for (const s of event.series) {
      const c = card(s.product), h = horizon(c, s.granularity);
      keepCandles(h, s.candles);
      h.predictions.clear();
      for (const p of s.predictions) keepPrediction(h, p);
      const last = s.candles[s.candles.length - 1];
      if (last && c.live == null) c.live = last.close;
      if (last && s.data_age_s != null) c.lastData = Date.now() - Math.max(0, s.data_age_s) * 1000;
      render(c, h);
      refreshAccuracy(c, h);
    }
  } else if (event.type === "candle") {
    const c = card(event.product);
    c.live = event.candle.close;
    c.lastData = Date.now();
    c.node.querySelector(".live").textContent = fmt(c.live);
    const h = c.horizons.get(event.granularity);
    if (h) { h.open = event.candle; draw(h); }
  } else if (event.type === "prediction") {
    const p = event.prediction, c = card(p.product), h = horizon(c, p.granularity);
    keepPrediction(h, p);
    c.lastData = Date.now();  // a prediction is made when a candle has just closed
    render(c, h);
    candleClosed(c, h);
  }
  tick();  // freshness at once, not at the clock's next tick
}

// A prediction means a candle just closed: read the closed candles and the accuracy again (once for
// all the models predicting at that moment).
function candleClosed(c, h) {
  clearTimeout(h.refresh);
  h.refresh = setTimeout(async () => {
    try {
      const rows = await (await fetch(`/api/candles/${c.product}?granularity=${h.g}`)).json();
      if (Array.isArray(rows)) { keepCandles(h, rows); draw(h); }
    } catch (e) { /* the next close tries again */ }
    refreshAccuracy(c, h);
  }, 300);
}

async function refreshAccuracy(c, h) {
  try {
    const scores = await (await fetch(`/api/accuracy/${c.product}?granularity=${h.g}`)).json();
    if (Array.isArray(scores)) { h.accuracy = Object.fromEntries(scores.map(a => [a.model, a])); render(c, h); }
  } catch (e) { /* shown again at the next close */ }
}

// -- drawing ----------------------------------------------------------------------------------------

function latest(h) {  // each model's newest prediction
  const out = {};
  for (const p of h.predictions.values()) if (!out[p.model] || p.as_of > out[p.model].as_of) out[p.model] = p;
  return out;
}

function render(c, h) {
  if (c.live != null) c.node.querySelector(".live").textContent = fmt(c.live);
  const newest = latest(h), models = Object.keys(newest).sort();
  h.node.querySelector("tbody").innerHTML = models.map(m => {
    const p = newest[m], a = h.accuracy[m] || {}, n = a.predictions || 0, few = n < MIN_SCORED;
    const skill = a.skill == null ? "" : a.skill >= 0 ? "better" : "worse";
    const why = few ? ` title="only ${n} prediction${n === 1 ? "" : "s"} scored so far: too few to judge"` : "";
    return `<tr data-model="${m}"><td><span class="swatch" style="background:${color(m, models)}"></span>${m}</td>` +
      `<td><span class="predicted">${fmt(p.predicted_close)}</span><span class="sub">${fmt(p.interval.lower, 0)} – ${fmt(p.interval.upper, 0)}</span></td>` +
      `<td class="mae${few ? " few" : ""}"${why}>${fmt(a.mae)}<span class="sub">n = ${n}</span></td>` +
      `<td class="skill${few ? " few" : ""}"${why}><span class="${skill}">${pct(a.skill)}</span></td></tr>`;
  }).join("");
  const any = newest[models[0]];
  h.node.querySelector(".meta").textContent = any
    ? `predicting the candle closing ${utc(secs(any.target_time))} · models ${any.model_version}` +
      `${any.pooled ? " (pooled)" : ""} · intervals ${calibrated(any.calibration)}`
    : "no prediction yet";
  draw(h);
}

// How a prediction's intervals were calibrated (the API's `calibration`).
function calibrated(c) {
  if (c.method === "device") return `calibrated on this device ${new Date(c.calibrated_at).toISOString().slice(0, 16).replace("T", " ")} UTC`;
  if (c.method === "pooled") return `of the pooled set (${c.note})`;
  return "calibrated in training";
}

// The chart: realized closes of the last candles (and the one still open), and for every model what it
// had predicted for each of those candles, its 80 % band, and its prediction for the candle now open.
function draw(h) {
  const el = h.node.querySelector(".chart");
  const closed = [...h.candles.values()].sort((a, b) => secs(a.time) - secs(b.time));
  if (!closed.length) return;
  const close = new Map(closed.map(k => [secs(k.time) + h.g, k.close]));
  const lastClosed = secs(closed[closed.length - 1].time) + h.g;
  const openAt = h.open ? secs(h.open.time) + h.g : null;
  const preds = [...h.predictions.values()];
  const models = [...new Set(preds.map(p => p.model))].sort();
  const xs = [...new Set([...close.keys(), ...(openAt ? [openAt] : []), ...preds.map(p => secs(p.target_time))])]
    .sort((a, b) => a - b);
  const at = new Map(preds.map(p => [`${p.model}@${secs(p.target_time)}`, p]));
  const data = [xs, xs.map(x => close.get(x) ?? null),
    xs.map(x => x === lastClosed && openAt ? close.get(x) : x === openAt ? h.open.close : null)];
  const series = [{}, {label: "close", stroke: "#e6e6e6", width: 1.5},
    {label: "live", stroke: "#e6e6e6", width: 1, dash: [4, 4], points: {show: true, size: 5}}];
  const bands = [];
  for (const m of models) {
    const col = color(m, models), get = f => xs.map(x => at.get(`${m}@${x}`)?.[f] ?? null);
    const interval = f => xs.map(x => at.get(`${m}@${x}`)?.interval[f] ?? null);
    data.push(get("predicted_close"), interval("upper"), interval("lower"));
    const i = series.length, dot = Math.max(4, 8 - 2 * models.indexOf(m));  // the first drawn largest: all stay visible
    series.push({label: m, stroke: col, width: 1, points: {show: true, size: dot, fill: col}},
                {label: `${m} 80 % upper`, stroke: col + "55", width: 0.5, points: {show: false}},
                {label: `${m} 80 % lower`, stroke: col + "55", width: 0.5, points: {show: false}});
    bands.push({series: [i + 1, i + 2], fill: col + "26"});
  }
  const layout = models.join(",");
  if (h.chart && h.layout === layout) { h.chart.setData(data); return; }
  if (h.chart) h.chart.destroy();
  h.layout = layout;
  h.chart = new uPlot({...size(el), series, bands, legend: {show: false}, cursor: {points: {show: false}},
                       axes: [{stroke: "#8b98a5", grid: {stroke: "#2a3542"}},
                              {stroke: "#8b98a5", grid: {stroke: "#2a3542"}, size: 64}]}, data, el);
  models.forEach(m => showModel(h, m, !hidden.has(m)));
  legend(h, models);
}

function size(el) {
  const width = Math.max(200, el.clientWidth);
  return {width, height: Math.round(Math.min(260, Math.max(180, width * 0.5)))};
}

function resize(h) {
  if (h.chart) h.chart.setSize(size(h.node.querySelector(".chart")));
}

function showModel(h, model, show) {
  h.chart.series.forEach((s, i) => {
    const label = s.label || "";
    if (i > 0 && (label === model || label.startsWith(`${model} 80 %`))) h.chart.setSeries(i, {show});
  });
}

function legend(h, models) {
  const box = h.node.querySelector(".legend");
  box.innerHTML = `<span class="key"><span class="swatch" style="background:#e6e6e6"></span>realized close</span>`;
  for (const m of models) {
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.model = m;
    b.setAttribute("aria-pressed", String(!hidden.has(m)));
    b.innerHTML = `<span class="swatch" style="background:${color(m, models)}"></span>${m} ± 80 %`;
    b.onclick = () => {
      const show = hidden.has(m);
      show ? hidden.delete(m) : hidden.add(m);
      localStorage.setItem("cryptopi.hidden", JSON.stringify([...hidden]));
      for (const c of products.values()) for (const other of c.horizons.values()) {
        if (!other.chart) continue;
        showModel(other, m, show);
        other.node.querySelectorAll(`.legend button[data-model="${m}"]`).forEach(x => x.setAttribute("aria-pressed", String(show)));
      }
    };
    box.appendChild(b);
  }
}

// -- status -----------------------------------------------------------------------------------------

function ago(ms) {
  const s = ms / 1000;
  if (s < 90) return `${Math.max(0, s).toFixed(1)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return s < 172800 ? `${Math.round(s / 3600)} h ago` : `${Math.round(s / 86400)} days ago`;
}

function tick() {
  for (const c of products.values()) {
    const fresh = c.node.querySelector(".fresh");
    if (c.lastData == null) { fresh.textContent = "waiting for data…"; continue; }  // nothing came yet
    const age = Date.now() - c.lastData;
    fresh.textContent = `updated ${ago(age)}`;
    fresh.classList.toggle("stale", age > 120_000);
  }
}

async function poll() {
  const status = document.getElementById("status"), list = document.getElementById("problems");
  try {
    const health = await (await fetch("/health")).json();
    for (const product of Object.keys(health.products)) card(product);
    const waiting = Object.entries(health.products).filter(([, p]) => p.prediction !== "ok")
      .map(([name, p]) => `${name}: ${p.prediction}`);
    status.textContent = (health.ingest_connected ? "Coinbase feed connected" : "Coinbase feed DISCONNECTED") +
      (waiting.length ? " · " + waiting.join(" · ") : " · models ok") + ` · v${health.version}`;
    status.className = "status " + (health.status === "ok" ? "ok" : "bad");
    list.innerHTML = "";
    for (const p of health.problems) {
      const item = document.createElement("li");
      item.textContent = `${p.message}${p.subject ? ` (${p.subject})` : ""} since ${new Date(p.since).toLocaleTimeString()}` +
        Object.entries(p.detail).map(([k, v]) => ` · ${k}: ${v}`).join("");
      list.appendChild(item);
    }
    list.hidden = !health.problems.length;
  } catch (e) {
    status.textContent = "appliance unreachable";
    status.className = "status bad";
  }
}

function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/stream`);
  ws.onmessage = m => onEvent(JSON.parse(m.data));
  ws.onclose = () => setTimeout(connect, 2000);  // the appliance restarted or the tunnel blinked
}

connect();
poll();
setInterval(poll, 5000);
setInterval(tick, 500);
