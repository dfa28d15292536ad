// cryptopi dashboard: one WebSocket (/api/stream) for candles and predictions, /health and
// /api/accuracy polled for status and realized accuracy. No build step, no framework.
"use strict";

const state = {};  // product -> {candles: Map(time -> candle), predictions: {model: p}, accuracy: {}, lastEvent}
const fmt = (x, d = 2) => x == null ? "—" : x.toLocaleString("en-US", {minimumFractionDigits: d, maximumFractionDigits: d});
const pct = x => x == null ? "—" : (x >= 0 ? "+" : "") + (100 * x).toFixed(2) + " %";

function card(product) {
  if (state[product]) return state[product];
  const node = document.getElementById("product-card").content.firstElementChild.cloneNode(true);
  node.dataset.product = product;
  node.querySelector(".product").textContent = product;
  document.getElementById("products").appendChild(node);
  return state[product] = {node, candles: new Map(), predictions: {}, accuracy: {}, lastEvent: null, chart: null};
}

function render(product) {
  const s = card(product);
  const candles = [...s.candles.values()].sort((a, b) => a.t - b.t);
  if (candles.length) s.node.querySelector(".live").textContent = fmt(candles[candles.length - 1].close);
  const rows = Object.values(s.predictions).sort((a, b) => a.model.localeCompare(b.model)).map(p => {
    const acc = s.accuracy[p.model] || {};
    const skill = acc.skill == null ? "" : acc.skill >= 0 ? "better" : "worse";
    return `<tr data-model="${p.model}"><td>${p.model}</td><td class="predicted">${fmt(p.predicted_close)}</td>` +
      `<td>${fmt(p.interval.lower, 0)} – ${fmt(p.interval.upper, 0)}</td><td>${fmt(acc.mae)}</td>` +
      `<td class="${skill}">${pct(acc.skill)}</td></tr>`;
  });
  s.node.querySelector("tbody").innerHTML = rows.join("");
  const any = Object.values(s.predictions)[0];
  if (any) s.node.querySelector(".meta").textContent =
    `prediction for the candle closing ${new Date(any.target_time).toISOString().slice(0, 16).replace("T", " ")} UTC · model ${any.model_version}`;
  drawChart(s, candles);
}

function drawChart(s, candles) {
  const recent = candles.slice(-48);
  if (!recent.length) return;
  const times = recent.map(c => c.t + 3600);  // plotted at each candle's close
  const preds = Object.values(s.predictions);
  const target = preds.length ? Date.parse(preds[0].target_time) / 1000 : null;
  const xs = target && target > times[times.length - 1] ? [...times, target] : times;
  const pad = arr => xs.map((_, i) => i < arr.length ? arr[i] : null);
  const series = [xs, pad(recent.map(c => c.close))];
  const opts = [{}, {label: "close", stroke: "#e6e6e6", width: 1.5}];
  for (const p of preds) {
    const at = i => (i === xs.length - 1 && target) ? p : null;
    series.push(xs.map((_, i) => at(i) ? p.predicted_close : null));
    opts.push({label: p.model, stroke: p.model === "cnn" ? "#f0883e" : "#58a6ff", width: 0,
               points: {show: true, size: 9}});
    series.push(xs.map((_, i) => at(i) ? p.interval.lower : null));
    series.push(xs.map((_, i) => at(i) ? p.interval.upper : null));
    opts.push({label: `${p.model} low`, stroke: "#8b98a5", points: {show: true, size: 4}, width: 0});
    opts.push({label: `${p.model} high`, stroke: "#8b98a5", points: {show: true, size: 4}, width: 0});
  }
  const el = s.node.querySelector(".chart");
  if (s.chart && s.chart.series.length === opts.length) { s.chart.setData(series); return; }
  if (s.chart) s.chart.destroy();
  s.chart = new uPlot({width: el.clientWidth || 480, height: 220, series: opts, legend: {show: false},
                       axes: [{stroke: "#8b98a5"}, {stroke: "#8b98a5", size: 70}]}, series, el);
}

function onEvent(event) {
  if (event.type === "snapshot") {
    for (const [product, candles] of Object.entries(event.candles)) {
      const s = card(product);
      for (const c of candles) s.candles.set(Date.parse(c.time) / 1000, {...c, t: Date.parse(c.time) / 1000});
    }
    for (const p of event.predictions) card(p.product).predictions[p.model] = p;
    for (const product of Object.keys(state)) { state[product].lastEvent = Date.now(); render(product); }
  } else if (event.type === "candle") {
    const s = card(event.product);
    const t = Date.parse(event.candle.time) / 1000;
    s.candles.set(t, {...event.candle, t});
    s.lastEvent = Date.now();
    render(event.product);
  } else if (event.type === "prediction") {
    const p = event.prediction;
    card(p.product).predictions[p.model] = p;
    state[p.product].lastEvent = Date.now();
    render(p.product);
  }
}

function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/stream`);
  ws.onmessage = m => onEvent(JSON.parse(m.data));
  ws.onclose = () => setTimeout(connect, 2000);  // the appliance restarted or the tunnel blinked
}

async function poll() {
  try {
    const health = await (await fetch("/health")).json();
    const el = document.getElementById("status");
    const problems = Object.entries(health.products).filter(([, p]) => p.prediction !== "ok")
      .map(([name, p]) => `${name}: ${p.prediction}`);
    el.textContent = `${health.ingest_connected ? "Coinbase feed connected" : "Coinbase feed DISCONNECTED"}` +
      (problems.length ? " · " + problems.join(" · ") : " · models ok") + ` · v${health.version}`;
    el.className = "status " + (health.status === "ok" ? "ok" : "bad");
    for (const product of Object.keys(health.products)) {
      const scores = await (await fetch(`/api/accuracy/${product}`)).json();
      card(product).accuracy = Object.fromEntries(scores.map(a => [a.model, a]));
      render(product);
    }
  } catch (e) { document.getElementById("status").textContent = "appliance unreachable"; }
}

setInterval(() => {
  for (const s of Object.values(state)) {
    if (s.lastEvent) s.node.querySelector(".fresh").textContent = `updated ${((Date.now() - s.lastEvent) / 1000).toFixed(1)} s ago`;
  }
}, 100);
connect();
poll();
setInterval(poll, 5000);
