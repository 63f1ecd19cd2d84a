// sfvideo live: the page of `sfvideo serve` (plain ES module, no build step).
// Protocol: see sfvideo/serve/server.py. Frames arrive as one binary message each (a JSON header and a JPEG), are
// decoded as they arrive and played from a short queue at the stream's frame rate.

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("controls"), prompt: $("prompt"), start: $("start"), stop: $("stop"), download: $("download"),
  error: $("prompt-error"), status: $("status"), model: $("model"), canvas: $("view"), caption: $("now-playing"),
  examples: $("examples"), vocab: $("vocabulary"), vocabWords: $("vocabulary-words"),
  firstChunk: $("first-chunk"), firstPaint: $("first-paint"), fps: $("fps"), frames: $("frames"),
  shown: $("shown"), delivery: $("delivery"), switches: $("switches"),
};
const ctx = ui.canvas.getContext("2d");
// Per chunk, ms from "chunk ready on the server" to its first / last frame decoded here (sfvideo.serve.measure).
window.sfvideo = { firstFrameMs: [], deliveryMs: [] };

const state = {
  ws: null, connected: false, streaming: false, starting: false, downloadPath: null, fps: 16,
  queue: [], decoding: Promise.resolve(), nextDue: 0, clickedAt: 0, painted: false, shown: 0, generated: 0,
  streamId: 0,
};

function setStatus(text) { ui.status.textContent = text; }
function setError(text) {
  ui.error.textContent = text || "";
  ui.prompt.setAttribute("aria-invalid", text ? "true" : "false");
}

function render() {
  ui.start.disabled = !state.connected || state.starting;
  ui.start.textContent = state.streaming ? "Switch prompt" : "Start";
  ui.stop.disabled = !state.streaming;
  ui.download.disabled = !(state.generated > 0 && state.downloadPath);
}

function send(message) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(message));
}

function resetFigures() {
  for (const el of [ui.firstChunk, ui.firstPaint, ui.fps, ui.delivery]) el.textContent = "–";
  ui.frames.textContent = ui.shown.textContent = ui.switches.textContent = "0";
  state.queue = []; state.painted = false; state.shown = 0; state.generated = 0;
}

function onHello(msg) {
  const g = msg.generator;
  state.downloadPath = msg.download;
  state.fps = msg.fps;
  ui.model.textContent = `${g.source} · ${g.device} ${g.dtype} · ${g.frame_width}×${g.frame_height} at ` +
    `${msg.fps} fps · up to ${msg.streams.limit} stream(s) at once`;
  ui.canvas.width = g.frame_width; ui.canvas.height = g.frame_height;
  ui.canvas.style.aspectRatio = `${g.frame_width} / ${g.frame_height}`;
  ui.canvas.classList.toggle("pixelated", Math.min(g.frame_width, g.frame_height) < 128);
  ui.prompt.maxLength = g.max_prompt_chars;
  ui.examples.replaceChildren(...g.examples.map((p) => Object.assign(document.createElement("option"), { value: p })));
  if (g.examples.length && !ui.prompt.value) ui.prompt.placeholder = g.examples[0];
  if (g.vocabulary) {
    ui.vocabWords.textContent = g.vocabulary.join(" · ") + (g.max_words ? ` (at most ${g.max_words} words)` : "");
    ui.vocab.hidden = false;
  }
  state.connected = true;
  setStatus("Ready. Type a prompt and press Enter.");
  render();
}

function onJson(msg) {
  switch (msg.type) {
    case "hello": onHello(msg); break;
    case "started":
      state.starting = false; state.streaming = true;
      setError(""); setStatus(`Streaming “${msg.prompt}” (seed ${msg.seed}).`);
      break;
    case "switching":
      setError(""); setStatus(`Switching to “${msg.prompt}” at the next chunk.`);
      break;
    case "error":
      state.starting = false;
      if (msg.field === "prompt") setError(msg.message); else setStatus(`Error: ${msg.message}`);
      break;
    case "busy":
      state.starting = false; setError(msg.message);
      break;
    case "stopped":
      state.streaming = false; state.starting = false;
      setStatus(`Stopped (${msg.reason}) after ${msg.frames} frames.` + (msg.frames ? " Download keeps them." : ""));
      break;
  }
  render();
}

function onFrame(buffer) {
  const view = new DataView(buffer);
  const headLen = view.getUint32(0);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, headLen)));
  const blob = new Blob([new Uint8Array(buffer, 4 + headLen)], { type: "image/jpeg" });
  const streamId = state.streamId;
  const decoded = createImageBitmap(blob);  // decoding starts now, off the main thread
  // Queue frames in arrival order.
  state.decoding = state.decoding.then(async () => {
    const image = await decoded;
    if (streamId !== state.streamId) { image.close(); return; }
    const delivery = Math.max(0, Date.now() - header.t_ready_ms);
    state.queue.push({ image, prompt: header.prompt });
    if (header.part === 0) window.sfvideo.firstFrameMs.push(delivery);
    if (header.part === 0 && header.recached) {
      setStatus(`Streaming “${header.prompt}”: switched at chunk ${header.index} ` +
        `(re-cache ${(1000 * header.recache_s).toFixed(0)} ms, no restart).`);
    }
    if (header.part !== header.frames - 1) return;
    // The chunk's last frame: update the figures.
    window.sfvideo.deliveryMs.push(delivery);
    ui.delivery.textContent = `${delivery.toFixed(0)} ms`;
    // Stay live: never more than three chunks behind the generator.
    const keep = 3 * Math.max(1, header.frames);
    while (state.queue.length > keep) state.queue.shift().image.close();
    state.generated = header.total_frames;
    ui.firstChunk.textContent = `${header.first_chunk_s.toFixed(2)} s`;
    ui.fps.textContent = header.fps.toFixed(1);
    ui.fps.dataset.chunk = String(header.index);
    ui.frames.textContent = String(header.total_frames);
    ui.switches.textContent = String(header.switches);
    render();
  }).catch((e) => setStatus(`Could not show a frame: ${e}`));
}

function play(now) {
  const interval = 1000 / state.fps;
  if (state.queue.length && now >= state.nextDue) {
    const { image, prompt } = state.queue.shift();
    ctx.drawImage(image, 0, 0, ui.canvas.width, ui.canvas.height);
    image.close();
    state.shown += 1;
    ui.shown.textContent = String(state.shown);
    if (ui.caption.textContent !== prompt) ui.caption.textContent = prompt;
    ui.canvas.setAttribute("aria-label", `Live video: ${prompt}`);
    if (!state.painted) {
      state.painted = true;
      ui.firstPaint.textContent = `${((performance.now() - state.clickedAt) / 1000).toFixed(2)} s`;
    }
    state.nextDue = Math.max(state.nextDue + interval, now - interval);
  }
  requestAnimationFrame(play);
}

function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (event) => (typeof event.data === "string" ? onJson(JSON.parse(event.data)) : onFrame(event.data));
  ws.onclose = (event) => {
    state.connected = state.streaming = state.starting = false;
    setStatus(`Disconnected from the server${event.reason ? ` (${event.reason})` : ""}. Reload the page to reconnect.`);
    render();
  };
  state.ws = ws;
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = ui.prompt.value.trim();
  if (!text) { setError("Type a prompt first."); ui.prompt.focus(); return; }
  setError("");
  if (state.streaming) {
    send({ type: "prompt", prompt: text });
  } else {
    resetFigures();
    state.streamId += 1;
    state.starting = true;
    state.clickedAt = performance.now();
    ui.caption.textContent = "Starting…";
    send({ type: "start", prompt: text });
  }
  render();
});
ui.stop.addEventListener("click", () => send({ type: "stop" }));
ui.download.addEventListener("click", () => {
  const link = Object.assign(document.createElement("a"), { href: state.downloadPath, download: "" });
  document.body.append(link);
  link.click();
  link.remove();
});
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.streaming) { event.preventDefault(); send({ type: "stop" }); }
});

render();
connect();
requestAnimationFrame(play);
ui.prompt.focus();
