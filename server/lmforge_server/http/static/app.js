// The lmforge console: plain JavaScript, no build step, talking to the gateway's /api.
"use strict";

const $ = (sel) => document.querySelector(sel);
const keyInput = $("#api-key");
keyInput.value = localStorage.getItem("lmforge-api-key") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("lmforge-api-key", keyInput.value);
  route();
});

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

function showError(message) {
  const el = $("#error");
  el.textContent = message || "";
  el.hidden = !message;
}

async function api(path, options) {
  options = options || {};
  const resp = await fetch(path, Object.assign({}, options, { headers: headers(options.headers) }));
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const message = (body.error && body.error.message) || resp.statusText;
    showError(`${resp.status}: ${message}`);
    throw new Error(message);
  }
  return body;
}

// Server-Sent Events over fetch (EventSource cannot send the Authorization header).
async function sse(path, options, onEvent, signal) {
  const resp = await fetch(path, Object.assign({}, options, { headers: headers(options.headers), signal }));
  if (!resp.ok) {
    const body = await resp.json().catch(() => ({}));
    throw new Error(`${resp.status}: ${(body.error && body.error.message) || resp.statusText}`);
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const ev = { event: "message", data: "" };
      for (const line of block.split("\n")) {
        const i = line.indexOf(":");
        const field = line.slice(0, i), val = line.slice(i + 1).replace(/^ /, "");
        if (field === "data") ev.data += val;
        else if (field === "event") ev.event = val;
        else if (field === "id") ev.id = val;
      }
      if (onEvent(ev.event, ev.data ? JSON.parse(ev.data) : {}, ev.id) === false) return;
    }
  }
}

const num = (x) => Number(x || 0);
function human(n) {
  n = num(n);
  for (const [d, s] of [[1e9, "B"], [1e6, "M"], [1e3, "k"]]) if (n >= d) return (n / d).toFixed(2) + s;
  return String(n);
}
function duration(s) {
  s = Math.round(num(s));
  if (!s) return "–";
  const m = Math.floor(s / 60);
  return m ? `${m}m${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}
const stateName = (s) => String(s || "").replace("JOB_STATE_", "").replace("MODEL_STATE_", "");
function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
  return td;
}

// ------------------------------------------------------------------ jobs

let jobsListed = 0; // the latest listing asked for: an older answer arriving later is dropped

async function showJobs() {
  const state = $("#jobs-filter").value;
  const listing = ++jobsListed;
  const { jobs } = await api("/api/jobs" + (state ? `?state=${state}` : ""));
  if (listing !== jobsListed) return;
  const body = $("#jobs-table tbody");
  body.replaceChildren();
  for (const j of jobs) {
    const tr = document.createElement("tr");
    tr.dataset.job = j.id;
    const link = document.createElement("a");
    link.href = `#/jobs/${j.id}`;
    link.textContent = j.id;
    cell(tr, "").appendChild(link);
    cell(tr, stateName(j.state));
    cell(tr, j.model_name);
    cell(tr, human(j.parameters.total));
    cell(tr, `${j.progress.step}/${j.progress.total_steps}`);
    cell(tr, num(j.progress.loss).toFixed(4));
    cell(tr, Math.round(num(j.progress.tokens_per_second)));
    cell(tr, duration(j.progress.eta_seconds));
    const actions = cell(tr, "");
    if (["QUEUED", "RUNNING"].includes(stateName(j.state))) {
      const b = document.createElement("button");
      b.textContent = "Cancel";
      b.className = "cancel";
      b.onclick = async () => { await api(`/api/jobs/${j.id}/cancel`, { method: "POST" }); showJobs(); };
      actions.appendChild(b);
    }
    body.appendChild(tr);
  }
  $("#jobs-table").dataset.state = state; // the filter these rows answer ("" for all)
}
$("#jobs-filter").addEventListener("change", showJobs);

// A line chart of [x, y] series in an SVG, axes scaled to the data.
function plot(svg, series) {
  const W = 600, H = 240, pad = 30;
  const all = series.flatMap((s) => s.points);
  svg.replaceChildren();
  if (!all.length) return;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const sx = (x) => pad + ((x - x0) / (x1 - x0)) * (W - 2 * pad);
  const sy = (y) => H - pad - ((y - y0) / (y1 - y0)) * (H - 2 * pad);
  const ns = "http://www.w3.org/2000/svg";
  for (const s of series) {
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("class", s.cls);
    line.setAttribute("points", s.points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "));
    line.dataset.points = s.points.length;
    svg.appendChild(line);
  }
  for (const [text, x, y] of [[y1.toPrecision(3), 2, pad - 4], [y0.toPrecision(3), 2, H - pad + 12], [`step ${x1}`, W - 70, H - 6]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", y); t.textContent = text;
    svg.appendChild(t);
  }
}

let watching = null;
async function showJob(id) {
  if (watching) watching.abort();
  watching = new AbortController();
  const job = await api(`/api/jobs/${id}`);
  $("#job-id").textContent = id;
  const split = $("#param-split tbody");
  split.replaceChildren();
  for (const k of ["embedding", "attention", "mlp", "norm", "total"]) {
    const tr = document.createElement("tr");
    tr.dataset.part = k;
    cell(tr, k === "mlp" ? "MLP" : k);
    cell(tr, human(job.parameters[k]));
    cell(tr, num(job.parameters[k]).toLocaleString("en"));
    split.appendChild(tr);
  }
  $("#flops").textContent = human(job.parameters.flops_per_token);
  $("#job-cancel").onclick = () => api(`/api/jobs/${id}/cancel`, { method: "POST" });
  const loss = [], val = [], lr = [], log = $("#job-log");
  log.replaceChildren();
  const redraw = () => {
    plot($("#loss-chart"), [{ cls: "train", points: loss }, { cls: "val", points: val }]);
    plot($("#lr-chart"), [{ cls: "lr", points: lr }]);
    $("#loss-points").textContent = loss.length;
    $("#val-points").textContent = val.length;
    $("#lr-points").textContent = lr.length;
  };
  const update = (ev) => {
    const p = ev.progress || {};
    $("#job-state").textContent = stateName(ev.state);
    if (num(p.step)) $("#job-step").textContent = p.step;
    if (num(p.total_steps)) $("#job-total").textContent = p.total_steps;
    if (ev.type === "JOB_EVENT_TYPE_PROGRESS") {
      loss.push([num(p.step), num(p.loss)]);
      lr.push([num(p.step), num(p.learning_rate)]);
      $("#job-loss").textContent = num(p.loss).toFixed(4);
      $("#job-tps").textContent = Math.round(num(p.tokens_per_second));
      $("#job-eta").textContent = duration(p.eta_seconds);
    } else if (ev.type === "JOB_EVENT_TYPE_EVAL") {
      val.push([num(p.step), num(p.val_loss)]);
      $("#job-val-loss").textContent = num(p.val_loss).toFixed(4);
    }
    if (ev.message) {
      const li = document.createElement("li");
      li.textContent = ev.message;
      log.prepend(li);
    }
  };
  $("#job-state").textContent = stateName(job.state);
  sse(`/api/jobs/${id}/events`, {}, (kind, data) => {
    if (kind === "error") { showError(`${data.status}: ${data.error.message}`); return false; }
    if (kind === "end") return false;
    update(data);
    redraw();
  }, watching.signal).catch((e) => { if (e.name !== "AbortError") showError(e.message); });
}

// ------------------------------------------------------------------ datasets

async function showDatasets() {
  const { datasets } = await api("/api/datasets");
  const body = $("#datasets-table tbody"), select = $("#job-dataset");
  body.replaceChildren();
  select.replaceChildren();
  for (const d of datasets) {
    const tr = document.createElement("tr");
    cell(tr, d.name);
    cell(tr, d.id.slice(0, 12));
    cell(tr, human(d.size_bytes) + "B");
    cell(tr, human(d.num_chars));
    cell(tr, d.num_distinct_chars);
    body.appendChild(tr);
    const opt = document.createElement("option");
    opt.value = d.id;
    opt.textContent = `${d.name} (${d.id.slice(0, 8)})`;
    select.appendChild(opt);
  }
}

$("#upload-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const file = $("#upload-file").files[0];
  if (!file) return;
  // XMLHttpRequest, not fetch: only it reports upload progress.
  const xhr = new XMLHttpRequest();
  xhr.open("POST", `/api/datasets?name=${encodeURIComponent(file.name.replace(/[^A-Za-z0-9._-]/g, "_"))}`);
  for (const [k, v] of Object.entries(headers())) xhr.setRequestHeader(k, v);
  const bar = $("#upload-progress");
  xhr.upload.onprogress = (ev) => { if (ev.lengthComputable) bar.value = ev.loaded / ev.total; };
  xhr.onload = () => {
    const body = JSON.parse(xhr.responseText || "{}");
    if (xhr.status >= 400) {
      showError(`${xhr.status}: ${body.error ? body.error.message : xhr.statusText}`);
      $("#upload-status").textContent = "failed";
      return;
    }
    bar.value = 1;
    $("#upload-status").textContent = `uploaded ${body.id}`;
    showDatasets().then(() => { $("#job-dataset").value = body.id; });
  };
  xhr.onerror = () => showError("upload failed: the connection broke");
  $("#upload-status").textContent = "uploading…";
  xhr.send(file);
});

$("#job-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const training = {};
  if ($("#job-max-steps").value) training.max_steps = Number($("#job-max-steps").value);
  if ($("#job-eval-interval").value) training.eval_interval = Number($("#job-eval-interval").value);
  const job = await api("/api/jobs", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      dataset_id: $("#job-dataset").value,
      preset: $("#job-preset").value,
      model_name: $("#job-name").value,
      training,
      request_id: crypto.randomUUID ? crypto.randomUUID() : String(Math.random()),
    }),
  });
  location.hash = `#/jobs/${job.id}`;
});

// ------------------------------------------------------------------ models

async function showModels() {
  const { models } = await api("/api/models");
  const body = $("#models-table tbody");
  body.replaceChildren();
  for (const m of models) {
    const tr = document.createElement("tr");
    cell(tr, m.name);
    cell(tr, m.version);
    cell(tr, stateName(m.state));
    cell(tr, human(m.parameters.total));
    cell(tr, m.val_loss ? num(m.val_loss).toFixed(4) : "–");
    cell(tr, m.val_bits_per_byte ? num(m.val_bits_per_byte).toFixed(4) : "–");
    cell(tr, m.onnx_parity_max_abs_diff ? num(m.onnx_parity_max_abs_diff).toExponential(1) : "–");
    cell(tr, (m.files || []).join(", "));
    body.appendChild(tr);
  }
}

// ------------------------------------------------------------------ playground

async function showPlayground() {
  const { models } = await api("/api/models");
  const select = $("#pg-model");
  const current = select.value;
  select.replaceChildren();
  for (const m of models.filter((m) => stateName(m.state) === "READY")) {
    const opt = document.createElement("option");
    opt.value = `${m.name}@${m.version}`;
    opt.textContent = `${m.name}@${m.version}`;
    select.appendChild(opt);
  }
  if (current) select.value = current;
}

let generating = null;
$("#pg-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (generating) generating.abort();
  generating = new AbortController();
  const out = $("#pg-output");
  out.textContent = "";
  for (const id of ["#pg-finish", "#pg-usage", "#pg-timings"]) $(id).textContent = "…";
  showError("");
  const stop = $("#pg-stop").value.replace(/\\n/g, "\n");
  const body = {
    model: $("#pg-model").value,
    prompt: $("#pg-prompt").value,
    temperature: $("#pg-temperature").value,
    top_k: $("#pg-top-k").value,
    top_p: $("#pg-top-p").value,
    max_tokens: $("#pg-max-tokens").value,
    seed: $("#pg-seed").value,
    stop: stop ? [stop] : [],
  };
  try {
    await sse("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) }, (kind, d) => {
      if (kind === "error") { showError(`${d.status}: ${d.error.message}`); return false; }
      if (kind !== "delta") return kind !== "end";
      out.textContent += d.text;
      out.dataset.deltas = Number(out.dataset.deltas || 0) + 1;
      if (d.final) {
        const t = d.timings;
        $("#pg-finish").textContent = String(d.finish_reason).replace("FINISH_REASON_", "").toLowerCase();
        $("#pg-usage").textContent = `${d.usage.prompt_tokens} prompt + ${d.usage.completion_tokens} completion tokens`;
        $("#pg-timings").textContent = `first token ${num(t.time_to_first_token_ms).toFixed(0)} ms, total ${num(t.total_ms).toFixed(0)} ms, ${num(t.tokens_per_second).toFixed(1)} tokens/s`;
      }
    }, generating.signal);
  } catch (err) {
    if (err.name !== "AbortError") showError(err.message);
  }
});
$("#pg-stop-btn").addEventListener("click", () => { if (generating) generating.abort(); });

// ------------------------------------------------------------------ routing

function route() {
  showError("");
  const [, page, id] = (location.hash || "#/jobs").split("/");
  const view = page === "jobs" && id ? "job" : page || "jobs";
  for (const s of document.querySelectorAll(".view")) s.classList.toggle("active", s.id === `view-${view}`);
  if (view !== "job" && watching) { watching.abort(); watching = null; }
  const show = { jobs: showJobs, job: () => showJob(id), datasets: showDatasets, models: showModels, playground: showPlayground }[view];
  if (show) show().catch(() => {});
}
window.addEventListener("hashchange", route);
route();
