// flowserve playground: draws what the server's public API answers, nothing else.
"use strict";

const $ = (id) => document.getElementById(id);
const SIZE = 640;
const TARGET_POINTS = 1500;
const MAX_FRAMES = 60;
const DENSITY_GRID = 48;
const DENSITY_BATCH = 1024;
const FIELD_GRID = 21;

const state = {
  key: "", // kept in this page's memory only
  models: [],
  model: null,
  view: "flow",
  frames: null, // what the animation shows: {times, draw(index)}
  frame: 0,
  timer: null,
  generation: 0, // bumps on every run: an older answer arriving late is dropped
};

class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
    this.detail = detail;
  }
}

// ------------------------------------------------------------------ the API

function headers(json) {
  const out = {};
  if (json) out["Content-Type"] = "application/json";
  if (state.key) out.Authorization = `Bearer ${state.key}`;
  return out;
}

async function call(path, body) {
  const options = body === undefined
    ? { headers: headers(false) }
    : { method: "POST", headers: headers(true), body: JSON.stringify(body) };
  const started = performance.now();
  const response = await fetch(path, options);
  const text = await response.text();
  const ms = performance.now() - started;
  if (!response.ok) {
    let detail = text || response.statusText;
    try {
      detail = JSON.parse(text).detail ?? detail;
    } catch (_) { /* not JSON: the text itself */ }
    throw new ApiError(response.status, detail);
  }
  return { data: path === "/metrics" ? text : JSON.parse(text), ms };
}

const HINTS = {
  401: "this server needs an API key: enter it above; the page keeps it in memory only",
  404: "no such model on this server",
  413: "the request is larger than this server's limits allow: ask for fewer samples or steps",
  422: "the server refused the request as it stands",
  503: "the server is busy or not ready: try again in a moment",
  504: "the request ran past its deadline",
};

function explain(error) {
  if (!(error instanceof ApiError)) return `The server could not be reached (${error.message}).`;
  const hint = HINTS[error.status];
  return `Error ${error.status}: ${error.detail}${hint ? ` (${hint})` : ""}`;
}

function showError(error) {
  const text = explain(error);
  const message = $("message");
  message.textContent = text;
  message.hidden = false;
  const ctx = context();
  ctx.fillStyle = "#fde8e8";
  ctx.fillRect(0, 0, SIZE, SIZE);
  ctx.fillStyle = "#8a1c1c";
  ctx.font = "18px system-ui, sans-serif";
  wrapText(ctx, text, 24, 48, SIZE - 48, 26);
}

function clearError() {
  $("message").hidden = true;
}

function wrapText(ctx, text, x, y, width, lineHeight) {
  let line = "";
  for (const word of text.split(" ")) {
    const next = line ? `${line} ${word}` : word;
    if (ctx.measureText(next).width > width && line) {
      ctx.fillText(line, x, y);
      line = word;
      y += lineHeight;
    } else {
      line = next;
    }
  }
  ctx.fillText(line, x, y);
}

// ------------------------------------------------------------------ the server's gauges

function metricValue(text, name, model) {
  const pattern = new RegExp(`^${name}\\{[^}]*model="${model}"[^}]*\\} (\\S+)$`, "m");
  const found = text.match(pattern);
  return found ? Number(found[1]) : null;
}

async function readGauges() {
  try {
    const text = (await call("/metrics")).data;
    const model = state.model.name;
    return {
      queued: metricValue(text, "flowserve_queue_requests", model),
      rows: metricValue(text, "flowserve_forward_pass_rows_sum", model),
      passes: metricValue(text, "flowserve_forward_pass_rows_count", model),
    };
  } catch (_) {
    return null; // the numbers are extras: a request still draws without them
  }
}

// Runs `work` while polling /metrics: the largest queue seen, and the mean rows per pass of the
// passes the engine ran meanwhile (the request's rows, and every other client's beside them).
async function withGauges(work) {
  const before = await readGauges();
  let queued = 0;
  const poll = setInterval(async () => {
    const now = await readGauges();
    if (now && now.queued !== null) queued = Math.max(queued, now.queued);
  }, 200);
  try {
    return await work();
  } finally {
    clearInterval(poll);
    const after = await readGauges();
    if (before && after && after.passes > before.passes) {
      const rows = (after.rows - before.rows) / (after.passes - before.passes);
      $("n-rows").textContent = `${rows.toFixed(0)} (${after.passes - before.passes} passes)`;
      $("n-queue").textContent = String(queued);
    }
  }
}

function showNumbers(what, nfe, ms) {
  $("n-request").textContent = what;
  $("n-nfe").textContent = nfe === undefined ? "-" : String(nfe);
  $("n-latency").textContent = `${ms.toFixed(0)} ms`;
}

// ------------------------------------------------------------------ drawing helpers

function context() {
  return $("canvas").getContext("2d");
}

function blank() {
  const ctx = context();
  ctx.fillStyle = "#ffffff";
  ctx.fillRect(0, 0, SIZE, SIZE);
  return ctx;
}

// Gaussian mixture from a manifest spec: {means, covs, weights}.
function cholesky2(cov) {
  const a = Math.sqrt(cov[0][0]);
  const b = cov[1][0] / a;
  return [a, b, Math.sqrt(Math.max(cov[1][1] - b * b, 0))];
}

function normal(random) {
  const u = 1 - random();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * random());
}

function mulberry32(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function mixtureSamples(spec, n) {
  const random = mulberry32(1);
  const total = spec.weights.reduce((a, b) => a + b, 0);
  const factors = spec.covs.map(cholesky2);
  const points = [];
  for (let i = 0; i < n; i++) {
    let u = random() * total;
    let k = 0;
    while (k < spec.weights.length - 1 && u > spec.weights[k]) u -= spec.weights[k++];
    const [a, b, c] = factors[k];
    const z1 = normal(random);
    const z2 = normal(random);
    points.push([spec.means[k][0] + a * z1, spec.means[k][1] + b * z1 + c * z2]);
  }
  return points;
}

function target(model) {
  const spec = model.config && model.config.target;
  return spec && spec.means && model.dim === 2 ? spec : null;
}

// A square box holding the source and the target (3 standard deviations of each component).
function bounds(model) {
  let lo = Infinity;
  let hi = -Infinity;
  for (const spec of [model.source, target(model)]) {
    if (!spec) continue;
    spec.means.forEach((mean, k) => {
      const spread = 3 * Math.sqrt(Math.max(...spec.covs[k].map((row, i) => row[i])));
      lo = Math.min(lo, mean[0] - spread, mean[1] - spread);
      hi = Math.max(hi, mean[0] + spread, mean[1] + spread);
    });
  }
  return { lo, hi };
}

function projector(box) {
  const scale = SIZE / (box.hi - box.lo);
  return (p) => [(p[0] - box.lo) * scale, SIZE - (p[1] - box.lo) * scale];
}

function drawPoints(ctx, points, project, color, radius) {
  ctx.fillStyle = color;
  for (const p of points) {
    const [x, y] = project(p);
    ctx.fillRect(x - radius, y - radius, 2 * radius, 2 * radius);
  }
}

// ------------------------------------------------------------------ request fields

function intValue(id) {
  return Number.parseInt($(id).value, 10);
}

function conditionFields(rows) {
  const condition = state.model.condition;
  if (!condition || condition.kind !== "class") return {};
  const fields = { guidance_scale: Number($("guidance").value) };
  const text = $("labels").value.trim();
  if (text) {
    const tokens = text.split(",").map((s) => s.trim()).filter(Boolean);
    const labels = tokens.map((s) => (/^-?\d+$/.test(s) ? Number(s) : s));
    fields.labels = labels.length === 1
      ? labels[0]
      : Array.from({ length: rows }, (_, i) => labels[i % labels.length]);
  }
  return fields;
}

function strideFor(steps, frames) {
  return Math.max(1, Math.ceil(steps / frames));
}

// ------------------------------------------------------------------ views

async function runFlow(generation) {
  const model = state.model;
  const body = {
    model: model.name,
    num_samples: intValue("num_samples"),
    num_steps: intValue("num_steps"),
    solver: $("solver").value,
    seed: intValue("seed"),
  };
  body.stride = strideFor(body.num_steps, MAX_FRAMES);
  Object.assign(body, conditionFields(body.num_samples));
  const { data, ms } = await withGauges(() => call("/trajectory", body));
  if (generation !== state.generation) return;
  showNumbers(`/trajectory ${body.num_samples} x ${body.num_steps} ${body.solver}`, data.nfe, ms);
  const box = bounds(model);
  const project = projector(box);
  const spec = target(model);
  const behind = spec ? mixtureSamples(spec, TARGET_POINTS) : [];
  const last = data.trajectory[data.trajectory.length - 1];
  const middle = (box.lo + box.hi) / 2;
  // Each particle keeps the colour of where it lands: which mode it went to.
  const colours = last.map((p) => {
    const angle = Math.atan2(p[1] - middle, p[0] - middle);
    return `hsl(${((angle / Math.PI) * 180 + 360) % 360}, 70%, 45%)`;
  });
  state.frames = {
    times: data.times,
    draw(index) {
      const ctx = blank();
      drawPoints(ctx, behind, project, "rgba(120, 120, 120, 0.18)", 2);
      data.trajectory[index].forEach((p, i) => {
        ctx.fillStyle = colours[i];
        const [x, y] = project(p);
        ctx.fillRect(x - 2, y - 2, 4, 4);
      });
    },
  };
  showFrame(data.times.length - 1);
  play();
}

function gridPoints(box, count) {
  const points = [];
  const step = (box.hi - box.lo) / count;
  for (let j = 0; j < count; j++) {
    for (let i = 0; i < count; i++) {
      points.push([box.lo + (i + 0.5) * step, box.lo + (j + 0.5) * step]);
    }
  }
  return { points, step };
}

async function runField(generation) {
  const model = state.model;
  const box = bounds(model);
  const { points } = gridPoints(box, FIELD_GRID);
  const t = Number($("t").value);
  const body = { model: model.name, t, x: points, ...conditionFields(points.length) };
  const { data, ms } = await withGauges(() => call("/velocity", body));
  if (generation !== state.generation) return;
  showNumbers(`/velocity ${points.length} points at t = ${t.toFixed(2)}`, data.nfe, ms);
  const speeds = data.velocity.map((v) => Math.hypot(v[0], v[1]));
  const fastest = Math.max(...speeds, 1e-9);
  const project = projector(box);
  const cell = SIZE / FIELD_GRID;
  const ctx = blank();
  const spec = target(model);
  if (spec) drawPoints(ctx, mixtureSamples(spec, TARGET_POINTS), project, "rgba(120,120,120,0.15)", 2);
  ctx.lineWidth = 1.5;
  points.forEach((p, i) => {
    const v = data.velocity[i];
    const length = (0.9 * cell * speeds[i]) / fastest;
    const [x, y] = project(p);
    const angle = Math.atan2(-v[1], v[0]);
    const x2 = x + length * Math.cos(angle);
    const y2 = y + length * Math.sin(angle);
    ctx.strokeStyle = `hsl(${220 - 200 * (speeds[i] / fastest)}, 75%, 42%)`;
    ctx.beginPath();
    ctx.moveTo(x, y);
    ctx.lineTo(x2, y2);
    ctx.lineTo(x2 - 5 * Math.cos(angle - 0.5), y2 - 5 * Math.sin(angle - 0.5));
    ctx.moveTo(x2, y2);
    ctx.lineTo(x2 - 5 * Math.cos(angle + 0.5), y2 - 5 * Math.sin(angle + 0.5));
    ctx.stroke();
  });
  $("n-extra-name").textContent = "largest |v|";
  $("n-extra").textContent = fastest.toFixed(2);
}

function heat(value) {
  // 0 -> white, 1 -> deep blue, through teal.
  const r = Math.round(255 * (1 - value) ** 2);
  const g = Math.round(255 * (1 - 0.55 * value));
  const b = Math.round(255 * (1 - 0.35 * value));
  return `rgb(${r},${g},${b})`;
}

async function runDensity(generation) {
  const model = state.model;
  const box = bounds(model);
  const { points, step } = gridPoints(box, DENSITY_GRID);
  const numSteps = Math.min(intValue("num_steps"), 50);
  const solver = $("solver").value;
  const logp = [];
  let nfe;
  const { ms } = await withGauges(async () => {
    const started = performance.now();
    for (let i = 0; i < points.length; i += DENSITY_BATCH) {
      const x = points.slice(i, i + DENSITY_BATCH);
      const body = { model: model.name, x, num_steps: numSteps, solver, ...conditionFields(x.length) };
      const { data } = await call("/log_prob", body);
      if (generation !== state.generation) return { ms: 0 };
      logp.push(...data.log_prob);
      nfe = data.nfe;
    }
    return { ms: performance.now() - started };
  });
  if (generation !== state.generation) return;
  showNumbers(`/log_prob ${points.length} points, ${numSteps} steps ${solver}`, nfe, ms);
  const density = logp.map(Math.exp);
  const top = Math.max(...density, 1e-30);
  const ctx = blank();
  const cell = SIZE / DENSITY_GRID;
  points.forEach((_, k) => {
    const i = k % DENSITY_GRID;
    const j = Math.floor(k / DENSITY_GRID);
    ctx.fillStyle = heat(density[k] / top);
    ctx.fillRect(i * cell, SIZE - (j + 1) * cell, cell + 0.5, cell + 0.5);
  });
  const mass = density.reduce((a, b) => a + b, 0) * step * step;
  $("n-extra-name").textContent = "mass in view";
  $("n-extra").textContent = mass.toFixed(3);
  // Samples on top: where the model puts its points, against where it puts its density.
  const sample = {
    model: model.name,
    num_samples: Math.min(intValue("num_samples"), 2000),
    num_steps: intValue("num_steps"),
    solver,
    seed: intValue("seed"),
    ...conditionFields(Math.min(intValue("num_samples"), 2000)),
  };
  const { data } = await call("/sample", sample);
  if (generation !== state.generation) return;
  drawPoints(ctx, data.samples, projector(box), "rgba(200, 40, 40, 0.7)", 1.5);
}

function imageShape(model) {
  const shape = model.shape || [model.dim];
  if (shape.length === 2) return { channels: 1, height: shape[0], width: shape[1] };
  if (shape.length === 3) return { channels: shape[0], height: shape[1], width: shape[2] };
  return null;
}

async function runImages(generation) {
  const model = state.model;
  const shape = imageShape(model);
  const condition = model.condition;
  const all = condition && condition.kind === "class" ? condition.classes : [""];
  // Every class, or the ones the labels field names (indices or class names).
  let indices = all.map((_, i) => i);
  const asked = $("labels").value.split(",").map((s) => s.trim()).filter(Boolean);
  if (condition && asked.length) {
    indices = asked.map((s) => (/^\d+$/.test(s) ? Number(s) : all.indexOf(s)));
  }
  const classes = indices.map((i) => all[i] ?? `#${i}`);
  const perClass = Math.max(1, Math.min(10, Math.floor(intValue("num_samples") / classes.length)));
  const rows = classes.length * perClass;
  const numSteps = intValue("num_steps");
  const body = {
    model: model.name,
    num_samples: rows,
    num_steps: numSteps,
    solver: $("solver").value,
    seed: intValue("seed"),
    stride: strideFor(numSteps, 20),
  };
  if (condition && condition.kind === "class") {
    body.labels = Array.from({ length: rows }, (_, i) => indices[Math.floor(i / perClass)]);
    body.guidance_scale = Number($("guidance").value);
  }
  const { data, ms } = await withGauges(() => call("/trajectory", body));
  if (generation !== state.generation) return;
  showNumbers(`/trajectory ${rows} images x ${numSteps} ${body.solver}`, data.nfe, ms);
  const [lo, hi] = model.data_range || [-1, 1];
  const labelWidth = 28;
  const cell = Math.floor(Math.min((SIZE - labelWidth) / perClass, SIZE / classes.length));
  const canvas = $("canvas");
  canvas.dataset.classes = String(classes.length);
  $("n-extra-name").textContent = "classes x per class";
  $("n-extra").textContent = `${classes.length} x ${perClass}`;
  state.frames = {
    times: data.times,
    draw(index) {
      const ctx = blank();
      const images = data.trajectory[index];
      const picture = ctx.createImageData(shape.width, shape.height);
      const scratch = document.createElement("canvas");
      scratch.width = shape.width;
      scratch.height = shape.height;
      const scratchCtx = scratch.getContext("2d");
      ctx.imageSmoothingEnabled = false;
      ctx.fillStyle = "#1b1f24";
      ctx.font = "14px system-ui, sans-serif";
      classes.forEach((name, c) => ctx.fillText(String(name), 4, c * cell + cell / 2 + 5));
      images.forEach((image, n) => {
        const pixels = image.flat(2);
        const plane = shape.height * shape.width;
        for (let p = 0; p < plane; p++) {
          for (let ch = 0; ch < 3; ch++) {
            const value = pixels[(shape.channels === 3 ? ch * plane : 0) + p];
            const level = Math.round((255 * (value - lo)) / (hi - lo));
            picture.data[4 * p + ch] = Math.max(0, Math.min(255, level));
          }
          picture.data[4 * p + 3] = 255;
        }
        scratchCtx.putImageData(picture, 0, 0);
        const row = Math.floor(n / perClass);
        const col = n % perClass;
        ctx.drawImage(scratch, labelWidth + col * cell + 1, row * cell + 1, cell - 2, cell - 2);
      });
    },
  };
  showFrame(data.times.length - 1);
  play();
}

const VIEWS = { flow: runFlow, field: runField, density: runDensity, images: runImages };

// ------------------------------------------------------------------ animation

function showFrame(index) {
  if (!state.frames) return;
  state.frame = index;
  state.frames.draw(index);
  const t = state.frames.times[index];
  $("t").value = String(t);
  $("t-value").textContent = t.toFixed(2);
}

function stop() {
  clearInterval(state.timer);
  state.timer = null;
  $("play").textContent = "Play";
}

function play() {
  stop();
  if (state.view === "field") {
    playField();
    return;
  }
  if (!state.frames) return;
  $("play").textContent = "Pause";
  let index = 0;
  state.timer = setInterval(() => {
    showFrame(index);
    index += 1;
    if (index >= state.frames.times.length) stop();
  }, 60);
}

async function playField() {
  $("play").textContent = "Pause";
  const mine = {};
  state.timer = mine;
  for (let t = 0; t <= 1.0001; t += 0.05) {
    if (state.timer !== mine) return;
    $("t").value = String(t);
    $("t-value").textContent = t.toFixed(2);
    await run();
  }
  if (state.timer === mine) stop();
}

// ------------------------------------------------------------------ wiring

async function run() {
  if (!state.model) return;
  const generation = ++state.generation;
  clearError();
  try {
    await VIEWS[state.view](generation);
  } catch (error) {
    if (generation === state.generation) showError(error);
  }
}

function rerun() {
  if (state.view !== "field") stop();
  run();
}

function selectView(view) {
  state.view = view;
  state.frames = null;
  stop();
  for (const button of $("tabs").querySelectorAll("button")) {
    button.setAttribute("aria-pressed", String(button.dataset.view === view));
  }
  $("canvas").dataset.view = view;
  $("time-row").hidden = view === "density"; // a density is the model's at t = 1
  $("n-extra-name").textContent = "-";
  $("n-extra").textContent = "-";
  run();
}

function describe(model) {
  const parts = [`dim ${model.dim}`];
  if (model.shape) parts.push(`shape ${model.shape.join(" x ")}`);
  if (model.condition) {
    parts.push(model.condition.kind === "class"
      ? `classes ${model.condition.classes.join(", ")}`
      : `condition of ${model.condition.dim} numbers`);
  }
  if (model.guidance_scale !== undefined) parts.push(`default guidance ${model.guidance_scale}`);
  return `${model.name}: ${parts.join("; ")}`;
}

function chooseModel(name) {
  state.model = state.models.find((m) => m.name === name) || state.models[0];
  const model = state.model;
  $("model-info").textContent = describe(model);
  const image = imageShape(model) !== null && (model.shape || []).length >= 2;
  const planar = model.dim === 2;
  const enabled = { flow: !image, field: planar, density: planar, images: image };
  for (const button of $("tabs").querySelectorAll("button")) {
    button.disabled = !enabled[button.dataset.view];
  }
  $("conditional").hidden = !(model.condition && model.condition.kind === "class");
  if (model.guidance_scale !== undefined) {
    $("guidance").value = String(model.guidance_scale);
    $("guidance-value").textContent = String(model.guidance_scale);
  }
  if (!enabled[state.view]) state.view = image ? "images" : "flow";
  if (image) $("num_samples").value = "40";
  selectView(state.view);
}

async function loadModels() {
  clearError();
  try {
    const { data } = await call("/models");
    state.models = data.models;
    const select = $("model");
    select.replaceChildren(...state.models.map((m) => new Option(m.name, m.name)));
    const wanted = new URLSearchParams(location.search).get("model");
    const first = state.models.find((m) => m.name === wanted) || state.models[0];
    if (!first) {
      showError(new ApiError(404, "this server serves no model"));
      return;
    }
    select.value = first.name;
    chooseModel(first.name);
  } catch (error) {
    showError(error);
  }
}

function setUp() {
  const solvers = document.querySelector('meta[name="flowserve-solvers"]').content.split(",");
  $("solver").replaceChildren(...solvers.map((s) => new Option(s, s)));
  $("setup").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value.trim();
    loadModels();
  });
  $("model").addEventListener("change", (event) => chooseModel(event.target.value));
  for (const button of $("tabs").querySelectorAll("button")) {
    button.addEventListener("click", () => selectView(button.dataset.view));
  }
  for (const id of ["num_samples", "num_steps", "solver", "seed", "labels", "guidance"]) {
    $(id).addEventListener("change", rerun);
  }
  $("guidance").addEventListener("input", () => {
    $("guidance-value").textContent = $("guidance").value;
  });
  $("t").addEventListener("input", () => {
    const t = Number($("t").value);
    $("t-value").textContent = t.toFixed(2);
    if (state.view === "field" || !state.frames) return;
    stop();
    const times = state.frames.times;
    let nearest = 0;
    times.forEach((time, i) => {
      if (Math.abs(time - t) < Math.abs(times[nearest] - t)) nearest = i;
    });
    showFrame(nearest);
  });
  $("t").addEventListener("change", () => {
    if (state.view === "field") rerun();
  });
  $("play").addEventListener("click", () => (state.timer ? stop() : play()));
  $("run").addEventListener("click", rerun);
  blank();
  if (document.querySelector('meta[name="flowserve-auth"]').content === "bearer") {
    // No call before there is a key: the first answer would only be a 401.
    const message = $("message");
    message.textContent = "This server needs an API key: enter it above and press Load models "
      + "(the page keeps it in memory only).";
    message.hidden = false;
    $("key").focus();
    return;
  }
  loadModels();
}

document.addEventListener("DOMContentLoaded", setUp);
