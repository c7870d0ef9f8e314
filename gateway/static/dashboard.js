// The fastserve dashboard: draws /dashboard/stream (docs/services.md, "Dashboard").
// Each job is one mark, kept by job id, so a job that is demoted, promoted,
// preempted or offloaded moves (a CSS transition) instead of being redrawn.
"use strict";

const MARK_W = 30, MARK_H = 18, GAP = 3, PAD = 4, LABEL_W = 118, MORE_W = 64;
const RATES = [["admitted", "admitted"], ["finished", "finished"], ["tokens", "tokens"],
  ["preemptions", "preemptions"], ["demotions", "demotions"], ["promotions", "promotions"],
  ["offloads", "offloads"], ["uploads", "uploads"]];
const SPARK_POINTS = 60;
const cards = new Map();  // instance id -> {el, marks: Map(job id -> element), spark: {key: [values]}}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s >= 1) return s.toFixed(2) + " s";
  if (s >= 0.001) return (s * 1e3).toFixed(1) + " ms";
  return (s * 1e6).toFixed(0) + " µs";
}
function fmtRate(v) { return v >= 100 ? v.toFixed(0) : v.toFixed(1); }
function fmtMs(v) { return v === null || v === undefined ? "–" : v.toFixed(v >= 10 ? 1 : 2) + " ms"; }

function card(replica) {
  let c = cards.get(replica.instance_id);
  if (c) return c;
  const el = document.getElementById("replica-template").content.firstElementChild.cloneNode(true);
  el.dataset.instance = replica.instance_id;
  const rates = el.querySelector(".rates");
  const spark = {};
  for (const [key, label] of RATES) {
    const tr = rates.insertRow();
    tr.innerHTML = `<td>${label}</td><td class="v rate-${key}">0</td><td><canvas width="90" height="16"></canvas></td>`;
    spark[key] = [];
  }
  c = {el, marks: new Map(), spark};
  cards.set(replica.instance_id, c);
  return c;
}

function laneRow(lanes, i) {
  let row = lanes.children[i];
  if (!row || !row.classList.contains("lane")) {
    row = document.createElement("div");
    row.className = "lane";
    row.innerHTML = '<div class="label"></div><div class="track"><span class="more"></span></div>';
    lanes.insertBefore(row, lanes.children[i] || null);
  }
  return row;
}

function drawLanes(c, replica) {
  const lanes = c.el.querySelector(".lanes");
  const width = Math.max(lanes.clientWidth - LABEL_W - MORE_W, MARK_W);
  const perRow = Math.max(1, Math.floor(width / (MARK_W + GAP)));
  const rows = [];
  replica.levels.forEach((lv, i) => {
    const row = laneRow(lanes, i);
    row.dataset.level = lv.level;
    const quantum = lv.quantum === null ? "∞" : fmtSeconds(lv.quantum);
    row.querySelector(".label").innerHTML = `<b>Q${lv.level}</b> ${quantum}<br>${lv.num_jobs} job${lv.num_jobs === 1 ? "" : "s"}`;
    row.querySelector(".more").textContent = lv.more ? `+${lv.more} more` : "";
    const n = Math.max(1, Math.ceil(lv.jobs.length / perRow));
    row.querySelector(".track").style.height = (n * (MARK_H + GAP) + 2 * PAD) + "px";
    rows.push(row);
  });
  while (lanes.querySelectorAll(".lane").length > replica.levels.length) lanes.querySelector(".lane:last-of-type").remove();
  const seen = new Set();
  replica.levels.forEach((lv, i) => {
    const top = rows[i].querySelector(".track").offsetTop + PAD;  // both relative to .lanes
    lv.jobs.forEach((job, k) => {
      seen.add(job.job_id);
      let m = c.marks.get(job.job_id);
      if (!m) {
        m = document.createElement("div");
        m.className = "mark";
        m.style.transform = `translate(${LABEL_W}px, ${top}px)`;  // enters at the start of its lane
        lanes.appendChild(m);
        c.marks.set(job.job_id, m);
      }
      const x = LABEL_W + (k % perRow) * (MARK_W + GAP), y = top + Math.floor(k / perRow) * (MARK_H + GAP);
      // Only what changed is written: every write costs the browser a style pass.
      const place = `translate(${x}px, ${y}px)`;
      if (m.style.transform !== place) m.style.transform = place;
      if (m.dataset.state !== job.state) m.className = "mark " + job.state;
      m.dataset.job = job.job_id;
      m.dataset.level = job.level;
      m.dataset.state = job.state;
      if (m.textContent !== String(job.generated)) m.textContent = job.generated;
      m.title = `${job.job_id}\n${job.state} · KV ${job.kv}\n${job.generated} tokens, prompt ${job.prompt_len}\n` +
        `charge ${fmtSeconds(job.charge)} in Q${job.level} (joined Q${job.join_level})`;
    });
  });
  for (const [id, m] of c.marks) {
    if (!seen.has(id)) {
      c.marks.delete(id);
      m.classList.add("gone");
      setTimeout(() => m.remove(), 450);
    }
  }
}

function sparkline(canvas, values) {
  const g = canvas.getContext("2d"), w = canvas.width, h = canvas.height;
  g.clearRect(0, 0, w, h);
  const max = Math.max(...values, 1e-9);
  g.strokeStyle = "#38bdf8";
  g.beginPath();
  values.forEach((v, i) => {
    const x = w - (values.length - 1 - i) * (w / (SPARK_POINTS - 1)), y = h - 1 - (v / max) * (h - 2);
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
}

function drawSide(c, r) {
  const el = c.el, kv = r.kv;
  el.querySelector(".kv-gpu").textContent = `${kv.gpu_used} / ${kv.gpu_total}`;
  el.querySelector(".kv-gpu-fill").style.width = (100 * kv.gpu_used / Math.max(kv.gpu_total, 1)) + "%";
  el.querySelector(".kv-host").textContent = `${kv.host_used} / ${kv.host_total}`;
  el.querySelector(".kv-host-fill").style.width = (100 * kv.host_used / Math.max(kv.host_total, 1)) + "%";
  el.querySelector(".copies").textContent = `copies in flight: ${kv.offloading} to host, ${kv.uploading} to GPU · ` +
    `${fmtRate(r.rates.offloads)} offloads/s, ${fmtRate(r.rates.uploads)} uploads/s`;
  for (const [key] of RATES) {
    const v = r.rates[key];
    el.querySelector(".rate-" + key).textContent = fmtRate(v);
    const hist = c.spark[key];
    hist.push(v);
    if (hist.length > SPARK_POINTS) hist.shift();
    sparkline(el.querySelector(".rate-" + key).nextElementSibling.firstElementChild, hist);
  }
  const loop = r.loop, split = el.querySelector(".split");
  const parts = [["schedule", loop.schedule_ms], ["step", loop.step_ms], ["bus", loop.bus_ms]];
  split.innerHTML = parts.map(([k, v]) => `<div class="${k}" style="flex-grow:${v || 0}" title="${k} ${fmtMs(v)}"></div>`).join("");
  el.querySelector(".iter-total").textContent = parts.map(([k, v]) => `${k} ${fmtMs(v)}`).join(" · ") +
    (loop.iteration_ms !== null ? ` · ${fmtMs(loop.iteration_ms)} per iteration` : "");
  el.querySelector(".info").textContent = `${r.instance_id} · ${r.policy} / KV ${r.kv_policy} · iteration ${r.iteration}` +
    ` · ${r.num_jobs} jobs, ${r.num_running} running (batch ≤ ${r.max_batch_size})`;
  el.querySelector(".name").textContent = `replica ${r.replica}`;
}

function histogram(canvas, dist, edges, slo) {
  const g = canvas.getContext("2d"), w = canvas.width, h = canvas.height, axis = 16;
  g.clearRect(0, 0, w, h);
  const lo = Math.log10(edges[0]), hi = Math.log10(edges[edges.length - 1]);
  const xOf = (v) => ((Math.log10(v) - lo) / (hi - lo)) * w;
  const max = Math.max(...dist.hist, 1);
  g.fillStyle = "#38bdf8";
  dist.hist.forEach((n, i) => {
    const x0 = xOf(edges[i]), x1 = xOf(edges[i + 1]), bh = (n / max) * (h - axis - 4);
    g.fillRect(x0 + 1, h - axis - bh, x1 - x0 - 2, bh);
  });
  g.fillStyle = "#94a3b8";
  g.font = "10px system-ui";
  const decade = {"-3": "1 ms", "-2": "10 ms", "-1": "100 ms", "0": "1 s", "1": "10 s", "2": "100 s"};
  for (let d = Math.ceil(lo); d <= hi; d++) g.fillText(decade[d] || `1e${d} s`, Math.min(xOf(10 ** d), w - 30), h - 3);
  if (slo) {
    g.strokeStyle = "#f87171";
    g.setLineDash([4, 3]);
    g.beginPath();
    g.moveTo(xOf(slo), 0);
    g.lineTo(xOf(slo), h - axis);
    g.stroke();
    g.setLineDash([]);
    g.fillStyle = "#f87171";
    g.fillText("SLO", xOf(slo) + 3, 10);
  }
}

function stats(dist) {
  return dist.count ? `p50 ${fmtSeconds(dist.p50)} · p90 ${fmtSeconds(dist.p90)} · p99 ${fmtSeconds(dist.p99)}` : "";
}

function render(view) {
  document.getElementById("model").textContent = `${view.model} · gateway ${view.gateway}`;
  const box = document.getElementById("replicas");
  const live = new Set(view.replicas.map((r) => r.instance_id));
  for (const [id, c] of cards) if (!live.has(id)) { c.el.remove(); cards.delete(id); }
  if (view.replicas.length) box.querySelector(".empty")?.remove();
  for (const r of view.replicas) {
    const c = card(r);
    if (!c.el.isConnected) box.appendChild(c.el);
    drawSide(c, r);
    drawLanes(c, r);
  }
  const lat = view.latency;
  document.getElementById("lat-count").textContent = `${lat.requests} in the last ${lat.window_s / 60} min`;
  document.getElementById("ttft-stats").textContent = stats(lat.ttft);
  document.getElementById("norm-stats").textContent = stats(lat.norm_latency);
  histogram(document.getElementById("ttft-hist"), lat.ttft, lat.bin_edges, null);
  histogram(document.getElementById("norm-hist"), lat.norm_latency, lat.bin_edges, view.replicas[0]?.slo);
}

function connect() {
  const status = document.getElementById("status");
  const source = new EventSource("/dashboard/stream");
  source.onopen = () => { status.textContent = "live"; status.className = "status live"; };
  source.onmessage = (e) => render(JSON.parse(e.data));
  source.onerror = () => { status.textContent = "reconnecting…"; status.className = "status down"; };
}

connect();
