// medray page: upload an image, show its nearest gallery images and the classification.
// The API key stays in this browser (localStorage) and goes out only as a bearer header.
"use strict";

const $ = (id) => document.getElementById(id);
const keyInput = $("apikey");
keyInput.value = localStorage.getItem("medray.apiKey") || "";
keyInput.addEventListener("change", () => {
  localStorage.setItem("medray.apiKey", keyInput.value.trim());
  loadModel();
});

function authHeaders() {
  return { Authorization: "Bearer " + keyInput.value.trim() };
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

async function apiError(resp) {
  try {
    const body = await resp.json();
    return `${resp.status}: ${body.reason || body.error}`;
  } catch (e) {
    return `HTTP ${resp.status}`;
  }
}

async function loadModel() {
  if (!keyInput.value.trim()) return;
  const resp = await fetch("/v1/model", { headers: authHeaders() });
  if (!resp.ok) { $("model").textContent = "model: " + (await apiError(resp)); return; }
  const m = await resp.json();
  $("model").textContent = `model: ${m.name || "?"} v${m.version ?? "?"}` + (m.alias ? ` @${m.alias}` : "");
}

// Thumbnails need the bearer key too, so they are fetched and shown as blob URLs.
async function thumbnail(img, url) {
  const resp = await fetch(url, { headers: authHeaders() });
  if (resp.ok) img.src = URL.createObjectURL(await resp.blob());
}

function labelSpan(text, match) {
  const s = document.createElement("span");
  s.className = "label" + (match ? " match" : "");
  s.textContent = text;
  return s;
}

function showNeighbours(neighbors, decided) {
  const grid = $("grid");
  grid.replaceChildren();
  $("kshown").textContent = neighbors.length;
  neighbors.forEach((n, i) => {
    const card = document.createElement("div");
    card.className = "neighbor";
    card.dataset.id = n.id;
    const img = document.createElement("img");
    img.alt = `neighbour ${i + 1}`;
    thumbnail(img, n.thumbnail_url);
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = `#${i + 1}  score ${n.score.toFixed(3)}`;
    const labels = document.createElement("div");
    (n.labels.length ? n.labels : ["(no label)"]).forEach((l) => labels.append(labelSpan(l, decided.has(l))));
    card.append(img, score, labels);
    grid.append(card);
  });
}

function showClasses(tasks) {
  const box = $("classes");
  box.replaceChildren();
  const decided = new Set();
  for (const [task, out] of Object.entries(tasks)) {
    const table = document.createElement("table");
    const cap = table.createCaption();
    cap.textContent = `${task} (${out.kind})`;
    const probs = Object.entries(out.probabilities).sort((a, b) => b[1] - a[1]);
    for (const [label, p] of probs) {
      const row = table.insertRow();
      if (out.decisions.includes(label)) { row.className = "decided"; decided.add(label); }
      row.insertCell().textContent = label;
      row.insertCell().textContent = p.toFixed(3);
    }
    box.append(table);
  }
  return decided;
}

async function query(file) {
  if (!keyInput.value.trim()) { setStatus("Enter an API key first.", true); return; }
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("k").value || "10");
  setStatus("Searching…");
  const resp = await fetch("/v1/classify?preview=true", { method: "POST", headers: authHeaders(), body: form });
  if (!resp.ok) { setStatus(await apiError(resp), true); return; }
  const out = await resp.json();
  $("result").hidden = false;
  $("query-img").src = out.query_preview;
  showNeighbours(out.neighbors, showClasses(out.tasks));
  setStatus(`${out.neighbors.length} neighbours from ${out.model} in ${out.took_ms.toFixed(0)} ms`);
  loadModel();
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) query(e.target.files[0]); });
const drop = $("drop");
["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.remove("over"); }));
drop.addEventListener("drop", (e) => { if (e.dataTransfer.files[0]) query(e.dataTransfer.files[0]); });
loadModel();
