// The colaft dashboard: the key holder's fine-tuning jobs, each job's loss curve, events and
// checkpoints (each one a model: its name answers chat and completions).
// Everything comes from the public API with the key in the Authorization header; the key is
// kept in this tab's sessionStorage only. Job events of type "metrics" carry the numbers:
// {step, total_steps, train_loss} per training step, valid_* once validation has run.
"use strict";
(() => {
  const KEY = "colaft.apiKey";
  const POLL_MS = 2000;
  const MAX_EVENTS_SHOWN = 300;
  const FINAL = new Set(["succeeded", "failed", "cancelled"]);
  const $ = (id) => document.getElementById(id);
  // events: job id -> {list (oldest first), ids, final: read in full after the job ended}
  // checkpoints: job id -> {list (newest first), final: read after the job ended}
  const state = { jobs: [], events: new Map(), checkpoints: new Map(), selected: null, timer: null, gen: 0,
                  chart: null, chartKey: "" };

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function api(path) {
    const response = await fetch(path, {
      headers: { Authorization: "Bearer " + sessionStorage.getItem(KEY) }, cache: "no-store",
    });
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON: the status says enough */ }
    if (!response.ok) {
      throw new ApiError(response.status, (body && body.error && body.error.message) || response.statusText);
    }
    return body;
  }

  async function listJobs() {
    const jobs = [];
    let after = null;
    for (;;) {
      const page = await api("/v1/fine_tuning/jobs?limit=100" + (after ? "&after=" + encodeURIComponent(after) : ""));
      jobs.push(...page.data);
      if (!page.has_more || !page.data.length) return jobs;
      after = page.data[page.data.length - 1].id;
    }
  }

  // Reads the events newer than those already held (the API lists newest first); once a job
  // has ended, reads all of its events one last time.
  async function refreshEvents(job) {
    const held = state.events.get(job.id);
    const final = FINAL.has(job.status);
    if (held && held.final) return;
    const rec = held && !final ? held : { list: [], ids: new Set(), final: false };
    const fresh = [];
    let after = null;
    for (;;) {
      const page = await api("/v1/fine_tuning/jobs/" + encodeURIComponent(job.id) + "/events?limit=500" +
                             (after ? "&after=" + encodeURIComponent(after) : ""));
      let reached = false;
      for (const e of page.data) {
        if (rec.ids.has(e.id)) { reached = true; break; }
        fresh.push(e);
      }
      if (reached || !page.has_more || !page.data.length) break;
      after = page.data[page.data.length - 1].id;
    }
    for (const e of fresh.reverse()) { rec.list.push(e); rec.ids.add(e.id); }
    rec.final = final;
    state.events.set(job.id, rec);
  }

  // The job's checkpoints (a few: the ends of its last epochs), read again until the job has ended.
  async function refreshCheckpoints(job) {
    const held = state.checkpoints.get(job.id);
    if (held && held.final) return;
    const page = await api("/v1/fine_tuning/jobs/" + encodeURIComponent(job.id) + "/checkpoints?limit=100");
    state.checkpoints.set(job.id, { list: page.data, final: FINAL.has(job.status) });
  }

  // The job's metrics by step (a step trained again after a restart keeps its newest numbers).
  function metricsByStep(jobId) {
    const rec = state.events.get(jobId);
    const byStep = new Map();
    for (const e of rec ? rec.list : []) {
      if (e.type === "metrics" && e.data && Number.isFinite(e.data.step)) {
        byStep.set(e.data.step, Object.assign(byStep.get(e.data.step) || {}, e.data));
      }
    }
    return new Map([...byStep.entries()].sort((a, b) => a[0] - b[0]));
  }

  function points(jobId) {
    return [...metricsByStep(jobId).values()].filter((m) => m.train_loss != null).map((m) => [m.step, m.train_loss]);
  }

  function progress(job) {
    const steps = [...metricsByStep(job.id).values()].filter((m) => m.total_steps);
    const last = steps[steps.length - 1];
    if (job.status === "succeeded") return { fraction: 1, text: last ? `${last.total_steps}/${last.total_steps} steps` : "done" };
    if (!last) return { fraction: 0, text: job.status === "queued" ? "waiting" : "–" };
    return { fraction: last.step / last.total_steps, text: `${last.step}/${last.total_steps} steps` };
  }

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    node.append(...children);
    return node;
  }

  const when = (seconds) => new Date(seconds * 1000).toLocaleString();
  const clock = (seconds) => new Date(seconds * 1000).toLocaleTimeString();

  function renderJobs() {
    $("jobs-section").hidden = false;
    $("no-jobs").hidden = state.jobs.length > 0;
    $("updated").textContent = "· updated " + new Date().toLocaleTimeString();
    const rows = state.jobs.map((job) => {
      const p = progress(job);
      const bar = el("span", { className: "bar" }, el("span"));
      bar.firstChild.style.width = Math.round(100 * p.fraction) + "%";
      const row = el("tr", { className: job.id === state.selected ? "selected" : "" },
        el("td", { className: "mono" }, job.id),
        el("td", {}, job.model),
        el("td", {}, el("span", { className: "status " + job.status }, job.status)),
        el("td", {}, when(job.created_at)),
        el("td", {}, bar, p.text));
      row.dataset.job = job.id;
      row.addEventListener("click", () => { state.selected = job.id; poll(); });
      return row;
    });
    $("jobs").replaceChildren(...rows);
  }

  function renderDetail() {
    const job = state.jobs.find((j) => j.id === state.selected);
    $("detail").classList.toggle("shown", Boolean(job));
    if (!job) { dropChart(); return; }
    $("detail-id").textContent = job.id;
    // a classification job answers with these names (head output i is labels[i])
    const labels = job.colaft && job.colaft.labels;
    $("labels").textContent = labels && labels.length ? "Labels: " + labels.map(String).join(" · ") : "";
    renderChart(job);
    const rec = state.events.get(job.id);
    const list = rec ? rec.list.slice(-MAX_EVENTS_SHOWN).reverse() : [];
    $("events").replaceChildren(...list.map((e) => el("li", { className: e.level },
      el("time", {}, clock(e.created_at)), e.message)));
    renderCheckpoints(job);
  }

  function renderCheckpoints(job) {
    const held = state.checkpoints.get(job.id);
    const list = held ? held.list : [];
    $("no-checkpoints").hidden = list.length > 0;
    $("checkpoints").replaceChildren(...list.map((c) => {
      const shown = Object.entries(c.metrics || {}).filter(([k, v]) => k !== "step" && typeof v === "number")
        .map(([k, v]) => `${k} ${Number.isInteger(v) ? v : v.toFixed(4)}`).join(" · ");
      const row = el("tr", {}, el("td", {}, String(c.step_number)), el("td", {}, shown || "–"),
        el("td", { className: "mono" }, c.fine_tuned_model_checkpoint));
      row.dataset.checkpoint = c.id;
      return row;
    }));
  }

  function renderChart(job) {
    const byStep = [...metricsByStep(job.id).values()];
    const steps = byStep.map((m) => m.step);
    const train = byStep.map((m) => m.train_loss ?? null);
    const valid = byStep.map((m) => m.valid_loss ?? null);
    const hasValid = valid.some((v) => v != null);
    const chartEl = $("chart");
    chartEl.dataset.points = String(train.filter((v) => v != null).length);

    const last = byStep.filter((m) => Object.keys(m).some((k) => k.startsWith("valid_"))).pop();
    $("validation").textContent = last
      ? `Validation at step ${last.step}: ` + Object.keys(last).filter((k) => k.startsWith("valid_"))
          .map((k) => `${k.slice(6)} ${Number(last[k]).toFixed(4)}`).join(" · ")
      : (job.validation_file ? "Validation metrics appear when the job ends." : "No validation file.");

    if (!steps.length) {
      dropChart();
      chartEl.replaceChildren(el("p", { className: "muted" }, "No training steps yet."));
      return;
    }
    const data = hasValid ? [steps, train, valid] : [steps, train];
    const key = job.id + (hasValid ? "+valid" : "");
    if (state.chart && state.chartKey === key) { state.chart.setData(data); return; }
    dropChart();
    chartEl.replaceChildren();
    const show = (u, v) => (v == null ? "–" : v.toFixed(4));
    const series = [{ label: "step" },
      { label: "training loss", stroke: "#0969da", width: 2, value: show, points: { size: 5 } }];
    if (hasValid) {
      series.push({ label: "validation loss", stroke: "#cf222e", fill: "#cf222e", value: show, paths: () => null,
                    points: { show: true, size: 9, fill: "#cf222e" } });
    }
    state.chart = new uPlot({
      width: chartEl.clientWidth || 600, height: 300, series,
      scales: { x: { time: false } },
      axes: [{ label: "step" }, { label: "loss", size: 60 }],
      cursor: { drag: { x: true, y: false } },
    }, data, chartEl);
    state.chartKey = key;
  }

  function dropChart() {
    if (state.chart) state.chart.destroy();
    state.chart = null;
    state.chartKey = "";
    $("chart").dataset.points = "0";
  }

  function showError(message) { $("error").textContent = message; $("error").classList.add("shown"); }
  function hideError() { $("error").classList.remove("shown"); }

  function reset() {
    clearTimeout(state.timer);
    state.gen += 1;
    state.jobs = [];
    state.events = new Map();
    state.checkpoints = new Map();
    state.selected = null;
    dropChart();
    for (const id of ["jobs", "events", "chart", "checkpoints"]) $(id).replaceChildren();
    $("detail-id").textContent = $("validation").textContent = "";
    $("jobs-section").hidden = true;
    $("detail").classList.remove("shown");
    $("hint").hidden = Boolean(sessionStorage.getItem(KEY));
    $("key").placeholder = sessionStorage.getItem(KEY) ? "Key set for this tab (paste another to switch)"
                                                       : "Paste your API key";
  }

  async function poll() {
    clearTimeout(state.timer);
    const gen = ++state.gen;
    try {
      const jobs = await listJobs();
      if (gen !== state.gen) return;
      state.jobs = jobs;
      if (!jobs.some((j) => j.id === state.selected)) state.selected = jobs.length ? jobs[0].id : null;
      const wanted = jobs.filter((j) => !FINAL.has(j.status) || j.id === state.selected ||
                                        (state.events.has(j.id) && !state.events.get(j.id).final));
      const selected = jobs.find((j) => j.id === state.selected);
      await Promise.all([...wanted.map(refreshEvents), ...(selected ? [refreshCheckpoints(selected)] : [])]);
      if (gen !== state.gen) return;
      hideError();
      renderJobs();
      renderDetail();
      state.timer = setTimeout(poll, POLL_MS);
    } catch (e) {
      if (gen !== state.gen) return;
      if (e instanceof ApiError && e.status === 401) {
        sessionStorage.removeItem(KEY);
        reset();
        showError("This API key was not accepted (401): " + e.message);
        return;
      }
      showError("Could not load the jobs: " + e.message + " — retrying.");
      state.timer = setTimeout(poll, 2 * POLL_MS);
    }
  }

  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    $("key").value = "";
    if (!key) { showError("Paste an API key first."); return; }
    sessionStorage.setItem(KEY, key);
    hideError();
    reset();
    poll();
  });
  $("forget").addEventListener("click", () => { sessionStorage.removeItem(KEY); hideError(); reset(); });
  window.addEventListener("resize", () => {
    if (state.chart) state.chart.setSize({ width: $("chart").clientWidth, height: 300 });
  });

  window.colaftDashboard = { state, points };  // read by the browser test
  reset();
  if (sessionStorage.getItem(KEY)) poll();
})();
