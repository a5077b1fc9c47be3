// The page: a view of the server's API. It keeps the current face as {latent, edits} and asks the server for
// every picture; no latent arithmetic happens here.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { base: null, edits: {}, caption: "", a: null, b: null, busy: false, dirty: false, draws: 0,
                maxUpload: Infinity };

async function api(path, options) {
  const response = await fetch(path, options);
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error; } catch (e) { /* not JSON: keep the status line */ }
    throw new Error(message);
  }
  return response;
}

function postJSON(path, body) {
  return api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

function say(message, isError) {
  $("status").textContent = message;
  $("status").classList.toggle("error", Boolean(isError));
}

async function show(img, blob) {  // an image element shows a PNG blob; resolves once its pixels are decoded
  const old = img.src;
  img.src = URL.createObjectURL(blob);
  if (old.startsWith("blob:") && old !== $("download").href) URL.revokeObjectURL(old);
  await img.decode();
  return img.src;
}

function currentFace() {
  const edits = {};
  for (const [id, amount] of Object.entries(state.edits)) if (amount !== 0) edits[id] = amount;
  return { latent: state.base, edits };
}

// Slider moves arrive faster than faces come back: one request at a time, and the newest values win.
async function redraw() {
  if (state.base === null) return;
  if (state.busy) { state.dirty = true; return; }
  state.busy = true;
  try {
    do {
      state.dirty = false;
      const started = performance.now();
      const blob = await (await postJSON("/api/decode", currentFace())).blob();
      const old = $("download").href;
      $("download").href = await show($("face"), blob);
      if (old.startsWith("blob:")) URL.revokeObjectURL(old);
      const ms = performance.now() - started;
      $("face").dataset.redrawMs = ms.toFixed(1);
      $("timing").textContent = `redrawn in ${ms.toFixed(0)} ms`;
      $("face-caption").textContent = state.caption;
      $("face").dataset.draws = ++state.draws;  // for tests and the curious: faces drawn so far
    } while (state.dirty);
    say("");
  } catch (e) {
    say(e.message, true);
  } finally {
    state.busy = false;
  }
}

function setBase(latent, caption) {
  state.base = latent;
  state.caption = caption;
  resetSliders();
  return redraw();
}

function resetSliders() {
  state.edits = {};
  for (const input of document.querySelectorAll(".sliders input")) {
    input.value = 0;
    input.nextElementSibling.value = "0.0";
  }
}

async function sampleFace() {
  const seed = Number($("seed").value) || 0;
  const temperature = Number($("temperature").value);
  try {
    const body = await (await api(`/api/sample?seed=${seed}&temperature=${temperature}&format=json`)).json();
    $("photo-figure").hidden = true;  // the face is no longer the photo's
    await setBase(body.latent, `from the prior: seed ${seed}, temperature ${temperature.toFixed(2)}`);
  } catch (e) {
    say(e.message, true);
  }
}

async function uploadPhoto(file) {
  if (file.size > state.maxUpload) {  // the server refuses it too (413); saying so here saves the upload
    say(`${file.name} is ${(file.size / 1048576).toFixed(1)} MiB, over the server's limit of ` +
        `${(state.maxUpload / 1048576).toFixed(1)} MiB`, true);
    return;
  }
  const form = new FormData();
  form.append("image", file);
  say(`encoding ${file.name}...`);
  try {
    const body = await (await api("/api/encode", { method: "POST", body: form })).json();
    $("photo-figure").hidden = false;
    await show($("photo"), file);
    await setBase(body.latent, `reconstruction of ${file.name}`);
  } catch (e) {
    say(`${file.name}: ${e.message}`, true);
  }
}

function addSlider(parent, direction, range) {
  const id = `slider-${direction.id.replace(/[^A-Za-z0-9_-]/g, "_")}`;
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = direction.label;  // text, never HTML: names come from the run directory
  if (direction.explained !== undefined) label.title = `${(100 * direction.explained).toFixed(1)}% of the variance`;
  const input = Object.assign(document.createElement("input"),
    { type: "range", id, min: -range, max: range, step: 0.1, value: 0 });
  input.dataset.direction = direction.id;
  const output = Object.assign(document.createElement("output"), { value: "0.0" });
  input.addEventListener("input", () => {
    state.edits[direction.id] = Number(input.value);
    output.value = Number(input.value).toFixed(1);
    redraw();
  });
  parent.append(label, input, output);
}

function describeRun(info) {
  const c = info.config;
  $("run").textContent = info.run;
  const parts = [];
  if (info.bits_per_dim !== null) parts.push(`${info.bits_per_dim.toFixed(3)} bits/dim (${info.bits_per_dim_key})`);
  if (info.psnr_db !== null) parts.push(`PSNR ${info.psnr_db.toFixed(2)} dB`);
  if (info.eval === null) parts.push("not evaluated yet (facevae evaluate RUN)");
  parts.push(`${c.image_size}x${c.image_size} ${c.channels === 1 ? "grey" : "RGB"}, latent ${c.latent_dim}, ` +
             `${c.likelihood}`);
  $("numbers").textContent = parts.join(" \u00b7 ");
  $("temperature").max = Math.min(info.limits.max_temperature, 3);
  state.maxUpload = info.limits.max_upload_bytes;
}

async function drawPair() {
  for (const side of ["a", "b"]) {
    if (state[side]) await show($(`face-${side}`), await (await postJSON("/api/decode", state[side])).blob());
  }
  if (!state.a || !state.b) return;
  const body = { a: state.a, b: state.b, steps: Number($("steps").value), mode: $("mode").value };
  try {
    await show($("strip"), await (await postJSON("/api/interpolate", body)).blob());
    $("strip").hidden = false;
    $("strip").dataset.steps = body.steps;
  } catch (e) {
    say(e.message, true);
  }
}

async function start() {
  try {
    const [info, directions] = await Promise.all([api("/api/info").then((r) => r.json()),
                                                  api("/api/directions").then((r) => r.json())]);
    describeRun(info);
    for (const d of directions.attributes) addSlider($("attribute-sliders"), d, 3);
    for (const d of directions.principal) addSlider($("principal-sliders"), d, 3);
    $("principal-title").hidden = directions.principal.length === 0;
    $("directions-note").textContent = directions.notes.join(" ");
  } catch (e) {
    say(`cannot read the run: ${e.message}`, true);
    return;
  }
  $("new-face").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 1e6); sampleFace(); });
  $("seed").addEventListener("change", sampleFace);
  $("temperature").addEventListener("input", () => {
    $("temperature-value").value = Number($("temperature").value).toFixed(2);
  });
  $("temperature").addEventListener("change", sampleFace);
  $("upload").addEventListener("change", (event) => {
    if (event.target.files[0]) uploadPhoto(event.target.files[0]);
    event.target.value = "";  // so that choosing the same photo again uploads it again
  });
  $("reset").addEventListener("click", () => { resetSliders(); redraw(); });
  $("set-a").addEventListener("click", () => { state.a = currentFace(); drawPair(); });
  $("set-b").addEventListener("click", () => { state.b = currentFace(); drawPair(); });
  $("steps").addEventListener("change", drawPair);
  $("mode").addEventListener("change", drawPair);
  await sampleFace();
  document.body.dataset.ready = "true";
}

start();
