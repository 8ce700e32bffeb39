// liveavatar client: one WebSocket for signalling and control (docs/protocol.md), one peer connection
// for media. No build step. Live figures are also kept in window.liveavatar.stats for automated tests.
"use strict";

const $ = (id) => document.getElementById(id);
const video = $("video");
const stats = {
  connected: false, connectedMs: null, backend: "", codec: "", fps: 0, framesShown: 0, firstFrameMs: null,
  lagMs: null, onsetLagMs: null, maxLagMs: null, sampleSteps: null, jitterMs: null, kbps: 0, serverFps: 0, errors: [],
};
window.liveavatar = { stats, events: [] };

let ws = null;
let socketReady = null;
let pc = null;
let config = null;
let pushes = Promise.resolve(); // pushes run one after another: each is one utterance with its own `finished`
let autoPushed = false;
let micStream = null;
let statsTimer = null;
let connectStart = 0;
let lastBytes = null;
let lastJitter = null;
let frameTimes = [];
let session = null; // id of the session playing now (from its answer)
let reconnected = false; // this Start already opened a new session once after `replica_lost`

function log(text) {
  const line = `${new Date().toISOString().slice(11, 23)} ${text}\n`;
  $("log").textContent = (line + $("log").textContent).slice(0, 6000);
}

function send(message) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(message));
}

function openSocket() {
  return new Promise((resolve, reject) => {
    // A server started with --auth-token is opened as /?token=...; the token goes on to the socket.
    const token = new URLSearchParams(location.search).get("token");
    const query = token ? `?token=${encodeURIComponent(token)}` : "";
    const socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws${query}`);
    socket.binaryType = "arraybuffer";
    socket.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.type === "config") resolve(msg);
      onMessage(msg);
    };
    socket.onerror = () => reject(new Error("WebSocket failed"));
    socket.onclose = () => {
      log("signalling closed");
      if (ws === socket) ws = null;
      // A stream already playing is not ended by losing its signalling (a cluster's front door restarting):
      // it plays on until its peer connection ends; Stop ends it.
      if (pc && stats.connected) log("signalling lost: the stream plays on until it ends (Stop ends it)");
      else teardown("not connected");
    };
    ws = socket;
  });
}

// One socket for the page's life: opened on load, so the badge names the backend before Start, and kept
// across sessions (Stop ends the session, not the connection).
function ensureSocket() {
  if (!ws || ws.readyState === WebSocket.CLOSING || ws.readyState === WebSocket.CLOSED) socketReady = openSocket();
  return socketReady;
}

function isRandom(msg) {
  return (msg.model?.weights ?? "").startsWith("random");
}

function backendLabel(msg) {
  if (msg.backend === "preview") return "preview (CPU)";
  return isRandom(msg) ? `${msg.backend} · RANDOM WEIGHTS (${msg.model.weights.slice(7)})` : msg.backend;
}

function onMessage(msg) {
  window.liveavatar.events.push(msg);
  switch (msg.type) {
    case "config":
      config = msg;
      stats.backend = msg.backend;
      $("backend").textContent = backendLabel(msg);
      $("backend").classList.toggle("preview", msg.backend === "preview");
      $("backend").classList.toggle("random", isRandom(msg));
      stats.maxLagMs = msg.maxLagMs ?? null;
      if (isRandom(msg)) log(`the server runs the model with RANDOM WEIGHTS (${msg.model.weights}): noise, not an avatar`);
      for (const note of msg.model?.notes ?? []) log(`server: ${note}`);
      if (msg.model?.realtime && !msg.model.realtime.keeps) log(`server: NOT REAL TIME: ${msg.model.realtime.advice}`);
      if (msg.turnError) log(`TURN is misconfigured on the server: ${msg.turnError}`);
      break;
    case "answer":
      session = msg.session;
      stats.codec = msg.videoCodec;
      pc.setRemoteDescription({ type: "answer", sdp: msg.sdp }).catch((e) => log(`answer: ${e}`));
      log(`session ${msg.session} (${msg.mode}, ${msg.videoCodec})`);
      break;
    case "stats":
      stats.lagMs = msg.lagMs;
      stats.onsetLagMs = msg.onsetLagMs;
      stats.serverFps = msg.fps;
      stats.sampleSteps = msg.sampleSteps || null;
      stats.maxLagMs = msg.maxLagMs ?? stats.maxLagMs;
      stats.realtime = msg.realtime ?? null;
      break;
    case "error":
      stats.errors.push(msg.code);
      log(`error ${msg.code}: ${msg.message}`);
      if (msg.code === "busy") log(`the server is busy: try again in ${msg.retryAfterS ?? 30} s`);
      if (msg.code === "replica_lost") replicaLost();
      break;
    case "closed":
      log(`${msg.type} ${JSON.stringify(msg)}`);
      if (msg.session === session) teardown(`session closed: ${msg.reason}`);
      break;
    case "started": case "finished": case "speech_start": case "speech_end": case "switched":
      log(`${msg.type} ${JSON.stringify(msg)}`);
      break;
  }
}

// A cluster's replica running the session died: open a new session (placed on a replica that is up), once per
// Start, so a cluster that keeps failing does not get a loop of offers.
function replicaLost() {
  if (!pc) return;
  const again = !reconnected;
  teardown(again ? "replica lost: reconnecting" : "replica lost: press Start to try again");
  if (!again) return;
  reconnected = true;
  log("the replica running this session is gone: opening a new session (once)");
  start();
}

function preferCodec(transceiver, codec) {
  if (codec === "auto" || !transceiver.setCodecPreferences || !RTCRtpReceiver.getCapabilities) return;
  const caps = RTCRtpReceiver.getCapabilities("video").codecs;
  const wanted = `video/${codec}`;
  const sorted = [...caps].sort((a, b) => (b.mimeType.toLowerCase() === wanted) - (a.mimeType.toLowerCase() === wanted));
  transceiver.setCodecPreferences(sorted);
}

function gatheringDone(peer, timeoutMs) {
  if (peer.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (peer.iceGatheringState === "complete") resolve(); };
    peer.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, timeoutMs); // the rest trickles in as "ice" messages
  });
}

async function readPortrait() {
  const file = $("portrait").files[0];
  if (!file) return undefined;
  if (config && file.size > config.maxUploadBytes) throw new Error(`portrait is over ${config.maxUploadBytes} bytes`);
  const url = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
  return url.slice(url.indexOf(",") + 1);
}

async function start() {
  $("start").disabled = true;
  const mode = $("mode").value;
  connectStart = performance.now();
  resetStats();
  autoPushed = false;
  try {
    config = await ensureSocket();
    pc = new RTCPeerConnection({ iceServers: config.iceServers, iceTransportPolicy: config.iceTransportPolicy });
    if (mode === "mic") {
      micStream = await navigator.mediaDevices.getUserMedia({ audio: { channelCount: 1, echoCancellation: true } });
      pc.addTransceiver(micStream.getAudioTracks()[0], { direction: "sendrecv", streams: [micStream] });
    } else {
      pc.addTransceiver("audio", { direction: "recvonly" });
    }
    preferCodec(pc.addTransceiver("video", { direction: "recvonly" }), $("codec").value);
    const remote = new MediaStream();
    video.srcObject = remote;
    pc.ontrack = (ev) => remote.addTrack(ev.track);
    pc.onconnectionstatechange = () => {
      if (pc && ["failed", "closed"].includes(pc.connectionState) && !ws) {
        teardown(`peer connection ${pc.connectionState}`); // no signalling left to say why: the stream is over
        return;
      }
      stats.connected = pc && pc.connectionState === "connected";
      if (stats.connected && stats.connectedMs === null) stats.connectedMs = Math.round(performance.now() - connectStart);
      log(`peer ${pc && pc.connectionState}`);
      if (stats.connected && mode === "push" && !autoPushed) {
        autoPushed = true; // Start speaks the sample once
        queuePush();
      }
    };
    let offerSent = false;
    pc.onicecandidate = (ev) => {
      if (!offerSent) return; // gathered before the offer: already inside its SDP
      if (ev.target !== pc) return; // a connection torn down meanwhile (its session is gone)
      const c = ev.candidate;
      send({ type: "ice", candidate: c ? c.candidate : null, sdpMid: c ? c.sdpMid : null, sdpMLineIndex: c ? c.sdpMLineIndex : null });
    };
    await pc.setLocalDescription(await pc.createOffer());
    await gatheringDone(pc, 1500);
    send({ type: "offer", sdp: pc.localDescription.sdp, mode, prompt: $("prompt").value, portrait: await readPortrait() });
    offerSent = true;
    watchFrames();
    video.play().catch(() => log("press play to hear the avatar"));
    statsTimer = setInterval(updateStats, 1000);
    for (const id of ["stop", "switch"]) $(id).disabled = false;
    for (const id of ["push", "interrupt"]) $(id).disabled = mode !== "push";
  } catch (e) {
    log(`start failed: ${e.message || e}`);
    stop();
  }
}

function watchFrames() {
  if (!video.requestVideoFrameCallback) return;
  const onFrame = (now) => {
    if (stats.firstFrameMs === null) {
      stats.firstFrameMs = Math.round(now - connectStart);
      log(`first frame after ${stats.firstFrameMs} ms`);
    }
    stats.framesShown += 1;
    frameTimes.push(now);
    if (pc) video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

async function updateStats() {
  const peer = pc;
  if (!peer) return;
  const now = performance.now();
  frameTimes = frameTimes.filter((t) => now - t < 2000);
  stats.fps = frameTimes.length > 1 ? (frameTimes.length - 1) / ((frameTimes.at(-1) - frameTimes[0]) / 1000) : 0;
  const report = await peer.getStats();
  if (pc !== peer) return; // stopped meanwhile: its figures are gone
  report.forEach((s) => {
    if (s.type !== "inbound-rtp" || s.kind !== "video") return;
    if (lastBytes) stats.kbps = Math.round((8 * (s.bytesReceived - lastBytes.bytes)) / (s.timestamp - lastBytes.time));
    lastBytes = { bytes: s.bytesReceived, time: s.timestamp };
    if (lastJitter && s.jitterBufferEmittedCount > lastJitter.count) {
      const delay = (s.jitterBufferDelay - lastJitter.delay) / (s.jitterBufferEmittedCount - lastJitter.count);
      stats.jitterMs = Math.round(delay * 1000);
    }
    lastJitter = { delay: s.jitterBufferDelay, count: s.jitterBufferEmittedCount };
  });
  const plus = (ms) => (ms === null || stats.jitterMs === null ? ms : ms + stats.jitterMs);
  const lag = plus(stats.lagMs);
  const onset = plus(stats.onsetLagMs);
  $("stats").textContent = [
    `${stats.fps.toFixed(1)} fps`,
    `lag ${lag === null ? "–" : lag + " ms"}${stats.maxLagMs ? " (bound " + stats.maxLagMs + " ms)" : ""}`,
    `speech→frame ${onset === null ? "–" : onset + " ms"}`,
    `${stats.kbps} kbps`,
    `${stats.backend}${stats.sampleSteps ? " · " + stats.sampleSteps + " steps" : ""}${stats.codec ? " · " + stats.codec : ""}` +
      `${stats.realtime && !stats.realtime.keeps ? " · NOT REAL TIME (see log)" : ""}`,
    `first frame ${stats.firstFrameMs === null ? "–" : (stats.firstFrameMs / 1000).toFixed(2) + " s"}`,
  ].join(" · ");
}

function queuePush() {
  pushes = pushes.then(pushSample).catch((e) => log(`push failed: ${e.message || e}`));
  return pushes;
}

async function pushSample() {
  const peer = pc; // the session this push belongs to; a Stop meanwhile ends it
  if (!peer) return;
  const data = await (await fetch("sample.wav")).arrayBuffer();
  const decoded = await new AudioContext().decodeAudioData(data);
  const offline = new OfflineAudioContext(1, Math.ceil(decoded.duration * 16000), 16000);
  const source = offline.createBufferSource();
  source.buffer = decoded;
  source.connect(offline.destination);
  source.start();
  const samples = (await offline.startRendering()).getChannelData(0);
  const pcm = new Int16Array(samples.length);
  for (let i = 0; i < samples.length; i++) pcm[i] = Math.max(-32768, Math.min(32767, samples[i] * 32767));
  const chunk = 3200; // 0.2 s, sent twice as fast as it plays, like a streaming TTS
  for (let i = 0; i < pcm.length; i += chunk) {
    if (pc !== peer || !ws) return;
    ws.send(pcm.slice(i, i + chunk).buffer);
    await new Promise((r) => setTimeout(r, 100));
  }
  if (pc === peer) send({ type: "push_end" });
}

function resetStats() {
  Object.assign(stats, {
    connected: false, connectedMs: null, codec: "", fps: 0, framesShown: 0, firstFrameMs: null, lagMs: null,
    onsetLagMs: null, sampleSteps: null, jitterMs: null, kbps: 0, serverFps: 0, realtime: null,
  });
  stats.maxLagMs = config?.maxLagMs ?? null;
  frameTimes = [];
}

// Ends the session on this side: no figures of a stream that is gone, and the poster instead of its last frame.
function teardown(status) {
  clearInterval(statsTimer);
  if (pc) pc.close();
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  pc = micStream = null;
  session = null;
  lastBytes = lastJitter = null;
  resetStats();
  video.srcObject = null;
  $("stats").textContent = status;
  $("start").disabled = false;
  for (const id of ["stop", "switch", "push", "interrupt"]) $(id).disabled = true;
}

function stop() {
  if (pc) send({ type: "stop" });
  teardown(ws ? "stopped" : "not connected");
}

function showMode() {
  $("push-row").hidden = $("mode").value !== "push";
}

function showPortrait() {
  const file = $("portrait").files[0];
  if (video.poster.startsWith("blob:")) URL.revokeObjectURL(video.poster);
  video.poster = file ? URL.createObjectURL(file) : "poster.png";
}

$("start").onclick = () => {
  reconnected = false;
  start();
};
$("stop").onclick = stop;
$("mode").onchange = showMode;
$("portrait").onchange = showPortrait;
$("push").onclick = queuePush;
$("interrupt").onclick = () => send({ type: "interrupt" });
$("switch").onclick = async () => {
  try {
    send({ type: "switch", prompt: $("prompt").value, portrait: await readPortrait() });
  } catch (e) {
    log(`switch failed: ${e.message || e}`);
  }
};
showMode();
ensureSocket().catch((e) => log(`cannot reach the server: ${e.message || e}`));
