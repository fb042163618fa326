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
    const err = new Error(message);
    err.status = resp.status;
    throw err;
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

const TERMINAL = ["done", "failed", "cancelled"];

// "1:05" / "1:02:03" for a time in seconds.
function clock(t) {
  t = Math.max(0, Math.floor(t));
  const h = Math.floor(t / 3600), m = Math.floor((t % 3600) / 60), s = String(t % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
}

// What a job cost, only where a machine price makes it mean something.
function costText(job) {
  const c = job.cost;
  if (!c) return "";
  if (!(c.cost_usd > 0)) return `${c.machine_seconds.toFixed(1)} machine-s (no machine price set: VTP_MACHINE_PRICE_HOUR)`;
  let text = `$${c.cost_usd.toFixed(4)}`;
  if (c.per_audio_hour_usd != null) {
    const [lo, hi] = c.managed_stt_per_audio_hour_usd;
    text += ` ($${c.per_audio_hour_usd.toFixed(3)} per audio hour; managed STT $${lo.toFixed(2)}-$${hi.toFixed(2)})`;
  }
  return text;
}

// A download of one output through the API (the link itself cannot carry the bearer token).
async function download(job, fmt) {
  const blob = await (await api(`/v1/jobs/${job.id}/transcript.${fmt}`)).blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `${(job.input_name || "").replace(/\.[^.]*$/, "") || "transcript"}.${fmt}`;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
  const area = document.createElement("textarea");  // plain http on a LAN address: the old way
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

// The parts of `spans` not covered by `minus` (both sorted lists of [start, end]).
function subtract(spans, minus) {
  const out = [];
  for (const [a, b] of spans) {
    let start = a;
    for (const [c, d] of minus) {
      if (d <= start || c >= b) continue;
      if (c > start) out.push([start, c]);
      start = Math.max(start, d);
      if (start >= b) break;
    }
    if (start < b) out.push([start, b]);
  }
  return out.filter(([a, b]) => b - a >= 0.05);
}

function jobPage() {
  const id = location.pathname.split("/").pop();
  let shownDone = false;

  function render(job) {
    $("title").textContent = job.input_name || "Job";
    document.title = `vtp — ${job.input_name || "job"}`;
    $("state").textContent = job.status;
    const p = job.progress;
    $("progress").value = job.status === "done" ? 1 : p.fraction;
    $("detail").textContent = p.chunks_total && job.status !== "done" ? `${p.chunks_done}/${p.chunks_total} chunks, ${p.audio_done.toFixed(0)}/${p.audio_total.toFixed(0)} s of speech` : "";
    $("cancel").hidden = TERMINAL.includes(job.status);
    if (job.error) { $("error").hidden = false; $("error").textContent = job.error; }
    if (job.status === "done" && !shownDone) { shownDone = true; showResult(job).catch(showError); }
  }

  function showError(e) { $("error").hidden = false; $("error").textContent = e.message; }

  async function showResult(job) {
    $("result").hidden = false;
    const cost = costText(job);
    $("stats").textContent = `${clock(job.duration)} of media (${job.duration.toFixed(1)} s) in ${job.wall_seconds.toFixed(1)} s`
      + (job.realtime_factor ? `, ${job.realtime_factor}x realtime` : "") + (cost ? `; ${cost}` : "");
    for (const fmt of job.formats) {
      const a = document.createElement("a"), copy = document.createElement("button");
      a.href = "#";
      a.textContent = `Download ${fmt.toUpperCase()}`;
      a.dataset.format = fmt;
      a.addEventListener("click", (e) => { e.preventDefault(); download(job, fmt).catch(showError); });
      copy.type = "button";
      copy.textContent = `Copy ${fmt.toUpperCase()}`;
      copy.dataset.copy = fmt;
      copy.addEventListener("click", async () => {
        try {
          await copyText(await (await api(`/v1/jobs/${id}/transcript.${fmt}?inline=1`)).text());
          $("copied").textContent = `${fmt.toUpperCase()} copied to the clipboard.`;
        } catch (e) { showError(e); }
      });
      const pair = document.createElement("span");
      pair.className = "pair";
      pair.append(a, copy);
      $("downloads").append(pair);
    }
    let tl;
    try {
      tl = await (await api(`/v1/jobs/${id}/timeline`)).json();
    } catch (e) {  // a job from before the review transcript: its plain text, as before
      const fmt = job.formats.includes("txt") ? "txt" : job.formats[0];
      if (fmt) { $("transcript-text").hidden = false; $("transcript-text").textContent = await (await api(`/v1/jobs/${id}/transcript.${fmt}?inline=1`)).text(); }
      return;
    }
    review(job, tl);
  }

  // The player, the transcript beside it and the speech timeline under it.
  function review(job, tl) {
    const cues = tl.cues, list = $("transcript"), items = [];
    let media = null, current = -1, stopAt = null;

    function makePlayer(audioOnly) {
      const box = $("player-box"), time = media ? media.currentTime : 0;
      box.textContent = "";
      media = document.createElement(audioOnly || (tl.media_type || "").startsWith("audio/") ? "audio" : "video");
      media.id = "player";
      media.controls = true;
      media.preload = "metadata";
      media.setAttribute("aria-label", `Media of ${job.input_name || "the job"}`);
      media.src = audioOnly ? tl.links.audio : tl.links.media;
      media.dataset.rendition = audioOnly ? "audio" : "original";
      const track = document.createElement("track");
      track.kind = "subtitles";
      track.label = "Transcript";
      track.srclang = tl.language || "en";
      track.src = tl.links.subtitles;
      track.default = true;
      media.append(track);
      box.append(media);
      if (time) media.currentTime = time;
      $("use-audio").hidden = audioOnly;
      $("rendition").textContent = audioOnly ? "Playing the audio-only version (the upload's own format cannot be played here)." : "";
      media.addEventListener("error", () => { if (!audioOnly) makePlayer(true); });
      media.addEventListener("loadedmetadata", () => { if (media.videoWidth === 0) media.classList.add("no-picture"); });
      media.addEventListener("timeupdate", follow);
      media.addEventListener("seeked", follow);
    }

    // The cue being spoken: the last that started at or before the playhead.
    function cueAt(t) {
      let lo = 0, hi = cues.length - 1, found = -1;
      while (lo <= hi) {
        const mid = (lo + hi) >> 1;
        if (cues[mid].start <= t + 0.01) { found = mid; lo = mid + 1; } else hi = mid - 1;
      }
      return found;
    }

    function follow() {
      const t = media.currentTime;
      if (stopAt !== null && t >= stopAt) { media.pause(); stopAt = null; }
      $("playhead").style.left = `${tl.duration ? Math.min(100, (100 * t) / tl.duration) : 0}%`;
      const i = cueAt(t);
      if (i === current) return;
      if (current >= 0) { items[current].classList.remove("current"); items[current].removeAttribute("aria-current"); }
      current = i;
      if (i < 0) return;
      items[i].classList.add("current");
      items[i].setAttribute("aria-current", "true");
      const top = items[i].offsetTop, bottom = top + items[i].offsetHeight;  // the list is their offsetParent
      if (top < list.scrollTop || bottom > list.scrollTop + list.clientHeight) list.scrollTop = top - list.clientHeight / 3;
    }

    function seek(t, play) {
      stopAt = null;
      media.currentTime = t;
      if (play) media.play().catch(() => {});
    }

    cues.forEach((cue, i) => {
      const li = document.createElement("li"), button = document.createElement("button"), time = document.createElement("span"), text = document.createElement("span");
      button.type = "button";
      button.className = "cue";
      button.dataset.start = cue.start;
      time.className = "time";
      time.textContent = clock(cue.start);
      text.className = "text";
      text.textContent = cue.text;
      button.append(time, text);
      button.setAttribute("aria-label", `${clock(cue.start)}: ${cue.text}`);
      button.addEventListener("click", () => seek(cue.start, true));
      li.append(button);
      list.append(li);
      items.push(li);
      li.dataset.index = i;
    });
    if (!cues.length) $("search-count").textContent = "No speech was transcribed.";

    // Search: keep the lines that contain the text, with each match marked.
    $("search").addEventListener("input", () => {
      const q = $("search").value.trim().toLowerCase();
      let shown = 0;
      cues.forEach((cue, i) => {
        const text = items[i].querySelector(".text"), lower = cue.text.toLowerCase();
        text.textContent = "";
        const hit = !q || lower.includes(q);
        items[i].hidden = !hit;
        if (hit) shown++;
        if (!q || !hit) { text.textContent = cue.text; return; }
        let at = 0, next;
        while ((next = lower.indexOf(q, at)) >= 0) {
          text.append(cue.text.slice(at, next));
          const mark = document.createElement("mark");
          mark.textContent = cue.text.slice(next, next + q.length);
          text.append(mark);
          at = next + q.length;
        }
        text.append(cue.text.slice(at));
      });
      $("search-count").textContent = q ? `${shown} of ${cues.length} lines` : "";
    });

    // The speech timeline: VAD speech, where words landed, and in red the speech without words.
    const bar = $("timeline"), dur = tl.duration || (cues.length ? cues[cues.length - 1].end : 0);
    // (a transcript from before the coverage stage wrote `unheard`: as workers/coverage.py counts it,
    // words cover 0.25 s around them and stretches under 1 s do not count)
    const covered = tl.words.map(([a, b]) => [a - 0.25, b + 0.25]);
    const unheard = tl.unheard !== undefined ? tl.unheard
      : subtract(tl.speech, covered).filter(([a, b]) => b - a >= 1.0);
    function span(cls, [a, b], el) {
      el = el || document.createElement("div");
      el.className = `span ${cls}`;
      el.style.left = `${(100 * a) / dur}%`;
      el.style.width = `${Math.max((100 * (b - a)) / dur, 0.3)}%`;
      bar.append(el);
      return el;
    }
    if (dur > 0) {
      bar.hidden = false;
      $("timeline-legend").hidden = false;
      for (const s of tl.speech) span("speech", s);
      for (const s of tl.words) span("words", s);
      for (const [a, b] of unheard) {
        const button = span("unheard", [a, b], document.createElement("button"));
        button.type = "button";
        button.setAttribute("aria-label", `Speech without words, ${clock(a)} to ${clock(b)} (${(b - a).toFixed(1)} s): play it`);
        button.title = `${clock(a)}–${clock(b)}: speech without words`;
        button.addEventListener("click", (e) => { e.stopPropagation(); seek(a, true); stopAt = b; });
      }
      const total = unheard.reduce((sum, [a, b]) => sum + (b - a), 0);
      $("unheard-summary").textContent = unheard.length ? `speech without words: ${unheard.length} stretch${unheard.length > 1 ? "es" : ""}, ${total.toFixed(1)} s` : "speech without words: none";
      bar.addEventListener("click", (e) => {
        const box = bar.getBoundingClientRect();
        seek(((e.clientX - box.left) / box.width) * dur, !media.paused);
      });
    }

    // Keys: space plays or pauses, the arrows move between lines. Not while typing; the player's
    // own controls keep theirs; other buttons and links keep Space (a line's button gives it to
    // the player: Enter plays from that line).
    document.addEventListener("keydown", (e) => {
      if (e.ctrlKey || e.metaKey || e.altKey) return;
      const el = document.activeElement, tag = el ? el.tagName : "";
      if (["INPUT", "TEXTAREA", "SELECT"].includes(tag) || el === media) return;
      if (e.key === " " && ["BUTTON", "A", "SUMMARY"].includes(tag) && !el.classList.contains("cue")) return;
      if (e.key === " ") {
        e.preventDefault();
        if (media.paused) media.play().catch(() => {}); else media.pause();
      } else if (["ArrowDown", "ArrowRight", "ArrowUp", "ArrowLeft"].includes(e.key) && cues.length) {
        e.preventDefault();
        const step = e.key === "ArrowDown" || e.key === "ArrowRight" ? 1 : -1;
        let i = cueAt(media.currentTime);
        do { i += step; } while (i >= 0 && i < cues.length && items[i].hidden);
        i = Math.max(0, Math.min(cues.length - 1, i));
        seek(cues[i].start, !media.paused);
        items[i].querySelector("button").focus();
      }
    });

    $("use-audio").addEventListener("click", () => makePlayer(true));
    const type = tl.media_type || "";
    const playable = !type || document.createElement(type.startsWith("audio/") ? "audio" : "video").canPlayType(type) !== "";
    makePlayer(!playable);
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
        if (TERMINAL.includes($("state").textContent)) return;
      } catch (e) {
        showError(e);
      }
      await new Promise((r) => setTimeout(r, 2000));
    }
  }

  $("cancel").addEventListener("click", async () => { await api("/v1/jobs/" + id, { method: "DELETE" }); await refresh(); });
  refresh().then(follow).catch((e) => { $("state").textContent = "unknown"; showError(e); });
}

// The token's jobs, a page at a time, refreshed while any of them is still moving.
function jobsPage() {
  const params = new URLSearchParams(location.search);
  const limit = Math.min(Math.max(parseInt(params.get("limit") || "20", 10) || 20, 1), 100);
  const offset = Math.max(parseInt(params.get("offset") || "0", 10) || 0, 0);
  let timer = null;

  function cell(row, content) {
    const td = document.createElement("td");
    if (content instanceof Node) td.append(content); else td.textContent = content;
    row.append(td);
    return td;
  }

  async function load() {
    let page;
    try {
      page = await (await api(`/v1/jobs?limit=${limit}&offset=${offset}`)).json();
    } catch (e) {
      $("status").textContent = e.status === 401 ? `${e.message}: set your API token on the upload page.` : e.message;
      clearTimeout(timer);
      if (e.status !== 401) timer = setTimeout(load, 5000);  // Redis away, a restart: try again
      return;
    }
    const body = $("jobs-body");
    body.textContent = "";
    for (const job of page.jobs) {
      const row = document.createElement("tr");
      row.dataset.job = job.id;
      const name = document.createElement("a");
      name.href = "/jobs/" + job.id;
      name.textContent = job.input_name || job.id;
      cell(row, name);
      const moving = !TERMINAL.includes(job.status);
      const st = cell(row, moving && job.progress.fraction > 0 ? `${job.status} ${Math.round(100 * job.progress.fraction)}%` : job.status);
      st.className = `state ${job.status}`;
      if (job.error) st.title = job.error;
      cell(row, job.duration ? clock(job.duration) : "—");
      cell(row, job.realtime_factor ? `${job.realtime_factor}x` : "—");
      const cost = job.cost && job.cost.cost_usd > 0 ? `$${job.cost.cost_usd.toFixed(4)}` : "—";
      const costCell = cell(row, cost);
      if (cost === "—" && job.cost) costCell.title = "no machine price set (VTP_MACHINE_PRICE_HOUR)";
      cell(row, new Date(job.created_at * 1000).toLocaleString());
      const links = document.createElement("span");
      const open = document.createElement("a");
      open.href = "/jobs/" + job.id;
      open.textContent = "Open";
      links.append(open);
      for (const fmt of job.formats) {
        const a = document.createElement("a");
        a.href = "#";
        a.textContent = fmt.toUpperCase();
        a.dataset.format = fmt;
        a.setAttribute("aria-label", `Download ${fmt.toUpperCase()} of ${job.input_name || job.id}`);
        a.addEventListener("click", (e) => { e.preventDefault(); download(job, fmt).catch((err) => { $("status").textContent = err.message; }); });
        links.append(" ", a);
      }
      cell(row, links);
      body.append(row);
    }
    const moving = page.jobs.filter((j) => !TERMINAL.includes(j.status)).length;
    $("status").textContent = page.jobs.length
      ? (moving ? `${moving} job${moving > 1 ? "s" : ""} queued or running (updating live).` : "")
      : (offset ? "No jobs on this page." : "No jobs yet: upload a file.");
    $("page-info").textContent = page.jobs.length ? `${offset + 1}–${offset + page.jobs.length}` : "";
    $("newer").hidden = offset === 0;
    $("newer").href = `/jobs?offset=${Math.max(offset - limit, 0)}&limit=${limit}`;
    $("older").hidden = page.next_offset == null;
    if (page.next_offset != null) $("older").href = `/jobs?offset=${page.next_offset}&limit=${limit}`;
    clearTimeout(timer);
    if (moving) timer = setTimeout(load, 2000);
  }
  load();
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "upload") uploadPage();
  else if (document.body.dataset.page === "job") jobPage();
  else if (document.body.dataset.page === "jobs") jobsPage();
});
