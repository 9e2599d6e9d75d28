// mve web page: classify an uploaded image; VAE samples and variations. Same-origin API only.
"use strict";
const base = document.body.dataset.base || "/";
const $ = (id) => document.getElementById(id);

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("api-key").value.trim();
  if (key) { h["Authorization"] = "Bearer " + key; sessionStorage.setItem("mve-key", key); }
  return h;
}

async function call(path, init) {
  $("error").textContent = "";
  const resp = await fetch(base + path, init);
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) {
    const err = body.error || {};
    throw new Error((err.message || err || resp.statusText) + " (" + resp.status + ")");
  }
  return body;
}

function chosenFile() {
  const f = $("file").files[0];
  if (!f) throw new Error("choose a PNG or JPEG first");
  return f;
}

async function classify() {
  const f = chosenFile();
  $("preview").src = URL.createObjectURL(f);
  $("preview").hidden = false;
  const out = await call("v1/classify?top_k=5", {
    method: "POST", body: f, headers: headers({"Content-Type": f.type || "application/octet-stream"}),
  });
  const list = $("predictions");
  list.replaceChildren();
  for (const s of out.predictions[0].top_k) {
    const li = document.createElement("li");
    li.className = "prediction";
    li.textContent = s.label + " " + (100 * s.probability).toFixed(1) + "%";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.round(120 * s.probability) + "px";
    li.appendChild(bar);
    list.appendChild(li);
  }
}

function vaeQuery(withN) {
  const q = new URLSearchParams({format: "json", temperature: $("temperature").value || "1"});
  if (withN) q.set("n", $("n").value || "16");
  if ($("seed").value !== "") q.set("seed", $("seed").value);
  return q.toString();
}

function showImages(out) {
  const box = $("samples");
  box.replaceChildren();
  for (const b64 of out.images) {
    const img = document.createElement("img");
    img.className = "sample";
    img.alt = "generated image";
    img.src = "data:image/png;base64," + b64;
    box.appendChild(img);
  }
}

async function sample() {
  const q = new URLSearchParams(vaeQuery(true));
  // Only /v1/vae/sample takes steps (the diffusion prior's sampler); empty means its default.
  if ($("steps").value !== "") q.set("steps", $("steps").value);
  showImages(await call("v1/vae/sample?" + q, {method: "POST", headers: headers()}));
}

async function variations() {
  const f = chosenFile();
  showImages(await call("v1/vae/variations?" + vaeQuery(true), {
    method: "POST", body: f, headers: headers({"Content-Type": f.type || "application/octet-stream"}),
  }));
}

async function loadModels() {
  try {
    const out = await call("v1/models", {headers: headers()});
    const names = out.models.map((m) => m.name + " " + m.checkpoint_id);
    $("status").textContent = names.length ? names.join(" · ") : "no models loaded";
    const have = new Set(out.models.map((m) => m.name));
    $("classifier-section").classList.toggle("disabled", !have.has("classifier"));
    $("vae-section").classList.toggle("disabled", !have.has("vae"));
  } catch (e) {
    $("status").textContent = "models: " + e.message;
  }
}

function guard(fn) {
  return () => fn().catch((e) => { $("error").textContent = e.message; });
}

$("api-key").value = sessionStorage.getItem("mve-key") || "";
$("api-key").addEventListener("change", loadModels);
$("classify-btn").addEventListener("click", guard(classify));
$("file").addEventListener("change", guard(classify));
$("sample-btn").addEventListener("click", guard(sample));
$("variations-btn").addEventListener("click", guard(variations));
loadModels();
