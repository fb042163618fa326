// The pages' only script: calls the JSON API with the user's bearer token (if any).
"use strict";

const tokenKey = "vtp-token";
const token = () => localStorage.getItem(tokenKey) || "";
const authHeaders = () => (token() ? { Authorization: "Bearer " + token() } : {});
const $ = (id) => document.getElementById(id);

async function api(path, options = {}) {
  const resp = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
  if (!resp.ok) {
    let message = resp.status + " " + resp.statusText;
    try { message = (await resp.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return resp;
}

function uploadPage() {
  const form = $("upload-form"), file = $("file"), drop = $("drop"), bar = $("upload-progress"), status = $("status");
  $("token").value = token();
  $("token").addEventListener("change", () => localStorage.setItem(tokenKey, $("token").value.trim()));
  api("/v1/models").then((r) => r.json()).then((list) => {
    for (const m of list.data) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = m.id;
      $("model").append(opt);
    }
  }).catch((e) => { status.textContent = e.message; $("token-box").open = true; });
  api("/v1/jobs?limit=10").then((r) => r.json()).then((page) => {
    for (const job of page.jobs) {
      const li = document.createElement("li"), a = document.createElement("a");
      a.href = "/jobs/" + job.id;
      a.textContent = job.input_name + " — " + job.status;
      li.append(a);
      $("recent-list").append(li);
    }
    $("recent").hidden = page.jobs.length === 0;
  }).catch(() => {});

  const show = () => { $("drop-text").textContent = file.files.length ? file.files[0].name : "Drop a video or audio file here, or click to pick one"; };
  file.addEventListener("change", show);
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) { file.files = e.dataTransfer.files; show(); } });

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    if (!file.files.length) { status.textContent = "Pick a file first."; return; }
    const data = new FormData();
    const language = $("language").value;
    if (language) data.append("language", language);
    if ($("task").value !== "transcribe") data.append("task", $("task").value);
    if ($("model").value) data.append("model", $("model").value);
    if ($("word_timestamps").checked) data.append("word_timestamps", "true");
    const formats = [...form.querySelectorAll("input[name=formats]:checked")].map((c) => c.value);
    data.append("formats", formats.join(","));
    data.append("file", file.files[0]);  // last: the fields arrive before the (large) file
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/jobs");
    for (const [k, v] of Object.entries(authHeaders())) xhr.setRequestHeader(k, v);
    bar.hidden = false;
    bar.value = 0;
    $("submit").disabled = true;
    status.textContent = "Uploading…";
    xhr.upload.addEventListener("progress", (p) => { if (p.lengthComputable) bar.value = p.loaded / p.total; });
    xhr.addEventListener("load", () => {
      $("submit").disabled = false;
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (err) { /* not JSON */ }
      if (xhr.status === 202 || xhr.status === 200) {
        location.href = "/jobs/" + body.id;
      } else {
        status.textContent = "Refused: " + ((body.error && body.error.message) || xhr.status);
      }
    });
    xhr.addEventListener("error", () => { $("submit").disabled = false; status.textContent = "Upload failed (connection lost)."; });
    xhr.send(data);
  });
}

function jobPage() {
  const id = location.pathname.split("/").pop();
  let shownDone = false;

  function render(job) {
    $("title").textContent = job.input_name || "Job";
    $("state").textContent = job.status;
    const p = job.progress;
    $("progress").value = job.status === "done" ? 1 : p.fraction;
    $("detail").textContent = p.chunks_total ? `${p.chunks_done}/${p.chunks_total} chunks, ${p.audio_done.toFixed(0)}/${p.audio_total.toFixed(0)} s of speech` : "";
    $("cancel").hidden = ["done", "failed", "cancelled"].includes(job.status);
    if (job.error) { $("error").hidden = false; $("error").textContent = job.error; }
    if (job.status === "done" && !shownDone) { shownDone = true; showResult(job); }
  }

  async function showResult(job) {
    $("result").hidden = false;
    const cost = job.cost && job.cost.per_audio_hour_usd != null
      ? `; $${job.cost.per_audio_hour_usd.toFixed(3)} per audio hour (managed STT: $${job.cost.managed_stt_per_audio_hour_usd[0].toFixed(2)}-$${job.cost.managed_stt_per_audio_hour_usd[1].toFixed(2)})`
      : "";
    $("stats").textContent = `${job.duration.toFixed(1)} s of media in ${job.wall_seconds.toFixed(1)} s` + (job.realtime_factor ? ` (${job.realtime_factor}x realtime)` : "") + cost;
    for (const fmt of job.formats) {
      const a = document.createElement("a");
      a.href = "#";
      a.textContent = fmt.toUpperCase();
      a.dataset.format = fmt;
      a.addEventListener("click", async (e) => {
        e.preventDefault();
        const blob = await (await api(`/v1/jobs/${id}/transcript.${fmt}`)).blob();
        const link = document.createElement("a");
        link.href = URL.createObjectURL(blob);
        link.download = `${job.input_name.replace(/\.[^.]*$/, "") || "transcript"}.${fmt}`;
        link.click();
        setTimeout(() => URL.revokeObjectURL(link.href), 10000);
      });
      $("downloads").append(a);
    }
    const fmt = job.formats.includes("txt") ? "txt" : job.formats[0];
    if (fmt) $("transcript").textContent = await (await api(`/v1/jobs/${id}/transcript.${fmt}?inline=1`)).text();
  }

  async function refresh() { render(await (await api("/v1/jobs/" + id)).json()); }

  async function follow() {
    // Server-Sent Events read through fetch (EventSource cannot send the Authorization header).
    for (let attempt = 0; attempt < 100 && !shownDone; attempt++) {
      try {
        const resp = await api(`/v1/jobs/${id}/events`);
        const reader = resp.body.getReader(), decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const chunk = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            if (chunk.split("\n").some((l) => l.startsWith("data: "))) await refresh();
          }
        }
        await refresh();
        if (["done", "failed", "cancelled"].includes($("state").textContent)) return;
      } catch (e) {
        $("error").hidden = false;
        $("error").textContent = e.message;
      }
      await new Promise((r) => setTimeout(r, 2000));
    }
  }

  $("cancel").addEventListener("click", async () => { await api("/v1/jobs/" + id, { method: "DELETE" }); await refresh(); });
  refresh().then(follow).catch((e) => { $("state").textContent = "unknown"; $("error").hidden = false; $("error").textContent = e.message; });
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "upload") uploadPage();
  else if (document.body.dataset.page === "job") jobPage();
});
