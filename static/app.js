// voice-agent page: microphone -> WebSocket (native protocol, docs/protocol.md) -> jitter-buffered player.
//
// Capture: getUserMedia with echo cancellation on, an AudioWorklet cutting 20 ms PCM16 frames at 16 kHz.
// Playback: an AudioWorklet player at 24 kHz that reports how much it has played (sent to the server as
// `playback`, so an interrupted reply is cut to what was heard) and drops everything on `interrupted`.
// All URLs are relative to the page, so it works behind a proxy under any prefix, over HTTPS/WSS.
// `window.voiceAgent` holds counters for tests and debugging.

const FRAME_MS = 20;
const MIC_RATE = 16000;
const PLAY_RATE = 24000;
const MAX_BUFFERED_BYTES = 256 * 1024; // a stalled network: drop mic frames rather than queue them

const $ = (id) => document.getElementById(id);

const stats = {
  connected: false, sessionId: null, framesSent: 0, framesDropped: 0, micRmsMax: 0,
  events: [], order: [], audioSamples: 0, playedSamples: 0, played: {}, responsesStarted: 0,
  interrupted: [], flushed: [], progressAfterCut: 0, errors: [], closeCode: null, lastTimings: null,
  transcripts: [],
};
window.voiceAgent = stats;

let info = null; // GET api/info
let conn = null; // the live connection and its audio graph

function wsUrl() {
  const url = new URL("ws", document.baseURI);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function setStatus(text, live = false) {
  $("status").textContent = text;
  $("status").classList.toggle("live", live);
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function loadInfo() {
  try {
    const response = await fetch("api/info", { cache: "no-store" });
    info = await response.json();
  } catch (err) {
    showError(`cannot reach the server: ${err.message || err}`);
    return;
  }
  $("model").textContent = `${info.model} · ${info.device} · ${info.dtype}`;
  $("download-command").textContent = info.download_command;
  $("demo-banner").hidden = !info.demo;
  $("key-row").hidden = !info.auth_required;
  const silence = info.settings.vad.silence_ms;
  $("silence").value = silence;
  $("silence-value").textContent = silence;
  for (const voice of info.voices) {
    const option = document.createElement("option");
    option.value = option.textContent = voice;
    $("voice").append(option);
  }
  if (info.settings.voice) $("voice").value = info.settings.voice;
  if (!info.ready) setStatus("model loading…");
}

// ---- connection --------------------------------------------------------------------------------

// The server refuses sessions while its model loads: wait for readyz instead of failing.
async function waitReady() {
  for (;;) {
    try {
      const response = await fetch("readyz", { cache: "no-store" });
      if (response.ok) return;
    } catch {
      // server restarting: keep waiting
    }
    setStatus("model loading…");
    await new Promise((resolve) => setTimeout(resolve, 500));
  }
}

async function start() {
  $("start").disabled = true;
  showError("");
  setStatus("starting…");
  try {
    await waitReady();
    setStatus("starting…");
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    let micCtx = new AudioContext({ sampleRate: MIC_RATE });
    let source;
    try {
      source = micCtx.createMediaStreamSource(stream);
    } catch {
      // Some browsers cannot resample a microphone into a 16 kHz context: capture at the device rate
      // and let the server resample.
      await micCtx.close();
      micCtx = new AudioContext();
      source = micCtx.createMediaStreamSource(stream);
    }
    const playCtx = new AudioContext({ sampleRate: PLAY_RATE, latencyHint: "interactive" });
    await Promise.all([
      micCtx.audioWorklet.addModule("static/capture-worklet.js"),
      playCtx.audioWorklet.addModule("static/player-worklet.js"),
    ]);
    const frameSamples = (micCtx.sampleRate * FRAME_MS) / 1000;
    const capture = new AudioWorkletNode(micCtx, "capture", { processorOptions: { frameSamples } });
    const mute = micCtx.createGain();
    mute.gain.value = 0; // keeps the capture node pulled by the graph without hearing yourself
    source.connect(capture).connect(mute).connect(micCtx.destination);
    const player = new AudioWorkletNode(playCtx, "player", { numberOfInputs: 0, outputChannelCount: [1] });
    player.connect(playCtx.destination);
    await Promise.all([micCtx.resume(), playCtx.resume()]);

    const ws = new WebSocket(wsUrl());
    ws.binaryType = "arraybuffer";
    conn = { stream, micCtx, playCtx, capture, player, ws, started: false, rid: null, cut: new Set(), entries: {},
      transcripts: {} };
    ws.onopen = () => ws.send(JSON.stringify(startMessage(micCtx.sampleRate, playCtx.sampleRate)));
    ws.onmessage = (e) => onMessage(e.data);
    ws.onclose = (e) => onClose(e);
    capture.port.onmessage = (e) => onFrame(e.data);
    player.port.onmessage = (e) => onPlayer(e.data);
  } catch (err) {
    showError(`could not start: ${err.message || err}`);
    await stop();
  }
}

function startMessage(sampleRate, outputRate) {
  return {
    type: "start",
    sample_rate: sampleRate,
    frame_ms: FRAME_MS,
    output_sample_rate: outputRate,
    voice: $("voice").value || undefined,
    vad: { silence_ms: Number($("silence").value) },
    key: info && info.auth_required ? $("key").value : undefined,
  };
}

async function stop() {
  const c = conn;
  conn = null;
  stats.connected = false;
  if (c) {
    if (c.ws.readyState <= WebSocket.OPEN) c.ws.close(1000);
    c.stream.getTracks().forEach((t) => t.stop());
    await Promise.allSettled([c.micCtx.close(), c.playCtx.close()]);
  }
  $("start").disabled = false;
  $("stop").disabled = $("interrupt").disabled = true;
  $("speaking").textContent = "";
  setStatus("idle");
}

function onClose(e) {
  stats.closeCode = e.code;
  if (e.code !== 1000 && e.code !== 1005) {
    showError(`connection closed (${e.code}${e.reason ? ": " + e.reason : ""})`);
  }
  stop();
}

function send(obj) {
  if (conn && conn.ws.readyState === WebSocket.OPEN) conn.ws.send(JSON.stringify(obj));
}

// ---- microphone --------------------------------------------------------------------------------

function onFrame({ pcm, rms }) {
  $("mic-level").value = rms;
  stats.micRmsMax = Math.max(stats.micRmsMax, rms);
  if (!conn || !conn.started || conn.ws.readyState !== WebSocket.OPEN) return;
  if (conn.ws.bufferedAmount > MAX_BUFFERED_BYTES) {
    stats.framesDropped++;
    return;
  }
  conn.ws.send(pcm);
  stats.framesSent++;
}

// ---- server messages ---------------------------------------------------------------------------

function onMessage(data) {
  if (!conn) return;
  if (data instanceof ArrayBuffer) {
    // Reply audio of the latest response.started; audio of a reply already cut may still be in flight.
    if (!conn.rid || conn.cut.has(conn.rid)) return;
    stats.audioSamples += data.byteLength / 2;
    stats.order.push("a");
    conn.player.port.postMessage({ type: "audio", rid: conn.rid, pcm: data }, [data]);
    return;
  }
  const ev = JSON.parse(data);
  stats.events.push(ev.type);
  switch (ev.type) {
    case "session.started":
      conn.started = stats.connected = true;
      stats.sessionId = ev.session_id;
      if (ev.demo) $("demo-banner").hidden = false;
      $("stop").disabled = $("interrupt").disabled = false;
      setStatus("listening", true);
      break;
    case "speech.started":
      $("speaking").textContent = "hearing you…";
      break;
    case "speech.stopped":
      $("speaking").textContent = "";
      addUserTurn(ev);
      break;
    case "response.started":
      conn.rid = ev.response_id;
      stats.responsesStarted++;
      conn.entries[ev.response_id] = addAssistantTurn();
      setStatus("agent speaking", true);
      break;
    case "text.delta":
      if (!conn.cut.has(ev.response_id)) {
        stats.order.push("t");
        conn.entries[ev.response_id].querySelector(".text").textContent += ev.text;
      }
      break;
    case "response.done":
      conn.player.port.postMessage({ type: "end", rid: ev.response_id });
      if (ev.reason === "cancelled" && conn.entries[ev.response_id]) {
        // The text ran ahead of the audio; keep what the listener heard (what the model remembers).
        conn.entries[ev.response_id].querySelector(".text").textContent = ev.text;
      }
      showTimings(ev);
      break;
    case "transcript":
      showTranscript(ev);
      break;
    case "interrupted":
      cut(ev.response_id);
      stats.interrupted.push({ rid: ev.response_id, played_ms: ev.played_ms });
      markInterrupted(ev.response_id, ev.played_ms);
      break;
    case "error":
      stats.errors.push(ev);
      showError(`${ev.code}: ${ev.message}`);
      break;
  }
}

function cut(rid) {
  if (conn.cut.has(rid)) return;
  conn.cut.add(rid);
  conn.player.port.postMessage({ type: "flush" });
  setStatus("listening", true);
}

// ---- player ------------------------------------------------------------------------------------

function onPlayer(msg) {
  if (!conn || msg.rid === null) return;
  const rate = conn.playCtx.sampleRate;
  if (msg.type === "flushed") {
    stats.flushed.push(msg);
  } else if (msg.type === "progress") {
    if (conn.cut.has(msg.rid)) stats.progressAfterCut++;
    send({ type: "playback", response_id: msg.rid, played_ms: Math.round((msg.played / rate) * 1000) });
    if (msg.drained) setStatus("listening", true);
  }
  stats.played[msg.rid] = msg.played;
  stats.playedSamples = Object.values(stats.played).reduce((a, b) => a + b, 0);
}

// ---- transcript --------------------------------------------------------------------------------

function addEntry(kind) {
  const li = document.createElement("li");
  li.className = kind;
  li.innerHTML = '<span class="text"></span><span class="meta"></span>';
  $("transcript").append(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

function addUserTurn(ev) {
  const li = addEntry(ev.turn ? "user" : "user ignored");
  const seconds = (ev.duration_ms / 1000).toFixed(1);
  li.querySelector(".text").textContent = ev.turn ? `(you spoke ${seconds} s)` : `(short sound, ${seconds} s: not an interruption)`;
  if (ev.turn && ev.item_id) {
    li.dataset.item = ev.item_id;
    const early = conn.transcripts[ev.item_id];  // a transcript can only follow its turn, but be safe
    if (early) showTranscript(early);
  }
}

// The user's own words (Whisper's transcript of the turn) replace the "(you spoke N s)" placeholder.
function showTranscript(ev) {
  stats.transcripts.push(ev);
  const li = document.querySelector(`#transcript li[data-item="${CSS.escape(ev.item_id)}"]`);
  if (!li) {
    conn.transcripts[ev.item_id] = ev;
    return;
  }
  const text = li.querySelector(".text");
  if (ev.error) {
    li.title = ev.error;  // no transcriber: the placeholder stays, the reason is a hover away
  } else if (ev.final) {
    text.textContent = ev.text;
  } else {
    if (!li.dataset.words) text.textContent = "";
    li.dataset.words = "1";
    text.textContent += ev.delta;
  }
}

function addAssistantTurn() {
  return addEntry("assistant");
}

function markInterrupted(rid, playedMs) {
  const li = conn.entries[rid];
  if (!li) return;
  li.classList.add("interrupted");
  const tag = document.createElement("span");
  tag.className = "tag";
  tag.textContent = ` interrupted after ${(playedMs / 1000).toFixed(1)} s`;
  li.querySelector(".meta").before(tag);
}

function showTimings(ev) {
  stats.lastTimings = ev.timings;
  const t = ev.timings;
  const ms = (v) => (v === null || v === undefined ? "–" : `${Math.round(v)} ms`);
  const line =
    `first audio ${ms(t.first_audio)} after you stopped (incl. ${ms(t.end_of_turn_ms)} end-of-turn wait)` +
    ` · first text ${ms(t.first_text)} · ${(ev.audio_ms / 1000).toFixed(1)} s of audio` +
    (ev.reason === "eos" ? "" : ` · ${ev.reason}`);
  const li = conn && conn.entries[ev.response_id];
  if (li) li.querySelector(".meta").textContent = line;
  $("latency").textContent = `last turn: ${line}`;
}

// ---- controls ----------------------------------------------------------------------------------

$("start").addEventListener("click", start);
$("stop").addEventListener("click", stop);
$("interrupt").addEventListener("click", () => {
  if (!conn || !conn.rid || conn.cut.has(conn.rid)) return;
  const played = stats.played[conn.rid] || 0;
  send({ type: "interrupt", played_ms: Math.round((played / conn.playCtx.sampleRate) * 1000) });
  cut(conn.rid); // stop at once; the server's `interrupted` confirms
});
$("silence").addEventListener("input", () => ($("silence-value").textContent = $("silence").value));
$("silence").addEventListener("change", () => send({ type: "update", vad: { silence_ms: Number($("silence").value) } }));
$("voice").addEventListener("change", () => send({ type: "update", voice: $("voice").value || null }));

loadInfo();
