// The playground page: pickers filled from the API, Speak (WebSocket, played while it arrives),
// Stop (cancel), Download WAV (POST), the live numbers and the server's session.done stats.
// Each number's element carries its raw value in data-value (what the browser test reads).

import { apiKey, getJSON, openSession, speechFile } from "./api.js";
import { Player } from "./player.js";
import { Waveform } from "./waveform.js";

const $ = (id) => document.getElementById(id);
const now = () => performance.now() / 1000;

let sampleRate = 22050; // replaced by the voice's, from v1/audio/voices
let player = null; // one AudioContext for the page, made on the first Speak (a user gesture)
const wave = new Waveform($("wave"), sampleRate);
let session = null; // the running WebSocket session
let live = null; // this session's counts

// --- showing things ----------------------------------------------------------------------------
function show(id, text, value = "") {
  const el = $(id);
  el.textContent = text;
  el.dataset.value = value;
}

function setState(state, text) {
  const el = $("status");
  el.dataset.state = state;
  el.textContent = text;
}

function showError(err) {
  const el = $("error");
  const retry = err.retryAfter != null ? ` (Retry-After: ${err.retryAfter} s)` : "";
  el.textContent = err.message + retry;
  el.dataset.code = err.error?.code ?? "";
  el.dataset.retryAfter = err.retryAfter ?? "";
  el.hidden = false;
}

function clearError() {
  const el = $("error");
  el.hidden = true;
  el.textContent = "";
  el.dataset.code = "";
}

const seconds = (s) => `${s.toFixed(2)} s`;
const ratio = (part, whole) => (whole ? part / whole : null);

function showCounts() {
  const audio = live.samples / sampleRate;
  show("audio", seconds(audio), audio);
  show("bytes", `${(live.bytes / 1024).toFixed(1)} KiB`, live.bytes);
  show("sentences", `${live.sentencesDone} / ${live.sentences}`, live.sentencesDone);
  if (live.firstAudio !== null) {
    const ttfa = live.firstAudio - live.started;
    show("ttfa", `${Math.round(ttfa * 1000)} ms`, ttfa);
    // generation time / audio time so far: below 1, the audio arrives faster than it plays
    const rtf = ((live.ended ?? now()) - live.started) / audio;
    show("rtf", rtf.toFixed(2), rtf);
  }
  const tpf = ratio(live.tokens, live.forwards);
  if (tpf !== null) show("tpf", tpf.toFixed(2), tpf);
  const acceptance = ratio(live.accepted, live.drafted);
  if (acceptance !== null) show("acceptance", `${Math.round(acceptance * 100)} %`, acceptance);
  else if (live.forwards) show("acceptance", "nothing drafted", "");
}

// AudioContext-driven numbers, the level meter and the waveform, once per frame while it plays.
function animate() {
  if (player) {
    const played = player.played;
    show("played", seconds(played), played);
    $("played").dataset.contextTime = player.context.currentTime;
    show("buffered", seconds(player.buffered), player.buffered);
    $("level").style.width = `${Math.min(100, Math.sqrt(player.level()) * 140)}%`;
    wave.draw(played);
  }
  if (session || player?.playing) requestAnimationFrame(animate);
  else $("level").style.width = "0%";
}

const STATS = [
  ["tokens", "tokens", (v) => v],
  ["target_forwards", "target forwards", (v) => v],
  ["mean_accepted_length", "tokens / target forward", (v) => v.toFixed(2)],
  ["drafted", "drafted", (v) => v],
  ["accepted", "accepted", (v) => v],
  ["time_to_first_audio_seconds", "time to first audio", (v) => `${Math.round(v * 1000)} ms`],
  ["real_time_factor", "real-time factor", (v) => v.toFixed(3)],
  ["audio_seconds", "audio", seconds],
  ["wall_seconds", "wall time", seconds],
  ["max_underrun_seconds", "longest stall", seconds],
  ["prompt_tokens", "prompt tokens", (v) => v],
  ["cached_prompt_tokens", "prompt tokens reused", (v) => v],
];

function showFinal(message) {
  const list = $("final");
  list.replaceChildren();
  const stats = message.stats ?? {};
  for (const [key, label, format] of STATS) {
    if (stats[key] === undefined || stats[key] === null) continue;
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = format(stats[key]);
    dd.dataset.key = key;
    dd.dataset.value = stats[key];
    list.append(dt, dd);
  }
  const status = $("final-status");
  status.textContent = message.status;
  status.dataset.value = message.status;
}

// --- the API -----------------------------------------------------------------------------------
function options() {
  const out = { model: $("model").value || undefined, voice: $("voice").value || undefined,
                speed: Number($("speed").value) };
  if ($("decoding").value) out.decoding = $("decoding").value;
  return out;
}

function fill(select, ids, preferred) {
  const keep = select.value;
  select.replaceChildren(...ids.map((id) => new Option(id, id)));
  select.value = ids.includes(keep) ? keep : ids.includes(preferred) ? preferred : ids[0];
}

async function loadLists() {
  clearError();
  try {
    const models = await getJSON("v1/models");
    const ids = models.data.map((m) => m.id);
    fill($("model"), ids, ids[0]); // the first is the server's default model
    $("model-picker").hidden = ids.length < 2; // one model: nothing to pick
    await loadModel();
  } catch (err) {
    showError(err);
    if (err.error?.code === "not_ready") setTimeout(loadLists, (err.retryAfter ?? 5) * 1000);
  }
}

// The chosen model's voices, sample rate and default decoding.
async function loadModel() {
  const model = $("model").value;
  const voices = await getJSON(`v1/audio/voices?model=${encodeURIComponent(model)}`);
  const voice = voices.voices[0];
  fill($("voice"), voices.voices.flatMap((v) => [v.id, ...v.aliases]), voice.id);
  sampleRate = voice.sample_rate;
  try {
    const ready = await getJSON("ready");
    const chosen = (ready.models ?? []).find((m) => m.name === model) ?? ready;
    const tree = chosen.default.tree_nodes ? `, ${chosen.default.tree_nodes}-node tree` : "";
    $("decoding").options[0].textContent = `auto (server default: ${chosen.default.decoding}${tree})`;
  } catch {
    // /ready is informative only
  }
}

function endSession() {
  session = null;
  live.ended ??= now();
  $("speak").disabled = false;
  $("stop").disabled = true;
}

async function speak() {
  if (session) return;
  clearError();
  if (!player || player.sampleRate !== sampleRate) {
    await player?.context.close();
    player = new Player(sampleRate);
  }
  player.reset();
  await player.resume();
  wave.reset(sampleRate);
  live = { started: now(), firstAudio: null, ended: null, stopped: false, bytes: 0, samples: 0,
           sentences: 0, sentencesDone: 0, tokens: 0, forwards: 0, drafted: 0, accepted: 0 };
  for (const id of ["ttfa", "rtf", "tpf", "acceptance", "audio", "bytes", "played", "buffered", "sentences"]) {
    show(id, "–");
  }
  $("sentence").textContent = "";
  $("final").replaceChildren();
  show("final-status", "");
  $("speak").disabled = true;
  $("stop").disabled = false;
  setState("connecting", "Connecting…");
  session = openSession({
    config: options(),
    text: $("text").value,
    on: {
      queued(message) {
        if (!live.stopped) setState("queued", `Queued: number ${message.position} in line…`);
      },
      start(message) {
        live.sentences += 1;
        $("sentence").textContent = message.sentence_text;
        if (!live.stopped) setState("speaking", `Speaking sentence ${message.sentence_index + 1}…`);
        showCounts();
      },
      audio(pcm) {
        if (live.stopped) return; // in flight when Stop was pressed
        live.firstAudio ??= now();
        live.bytes += pcm.length * 2;
        live.samples += pcm.length;
        player.push(pcm);
        wave.add(pcm);
        showCounts();
      },
      sentence(message) {
        const stats = message.stats;
        live.sentencesDone += 1;
        live.tokens += stats.tokens;
        live.forwards += stats.target_forwards;
        live.drafted += stats.drafted;
        live.accepted += stats.accepted;
        showCounts();
      },
      done(message) {
        endSession();
        showCounts();
        showFinal(message);
        const words = { completed: "Done", cancelled: "Stopped", error: "Failed" };
        setState(message.status, words[message.status] ?? message.status);
      },
      error(err) {
        endSession();
        showError(err);
        setState("error", "Error");
      },
      closed(event) {
        endSession();
        showError({ message: `the connection closed (code ${event.code}${event.reason ? `: ${event.reason}` : ""})` });
        setState("error", "Error");
      },
    },
  });
  requestAnimationFrame(animate);
}

function stop() {
  if (!session) return;
  live.stopped = true;
  session.cancel();
  player.stop();
  setState("stopping", "Stopping…");
}

async function download() {
  clearError();
  const button = $("download");
  button.disabled = true;
  try {
    const wav = await speechFile({ ...options(), input: $("text").value });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(wav);
    link.download = "spectts.wav";
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
  } catch (err) {
    showError(err);
  } finally {
    button.disabled = false;
  }
}

// --- wiring ------------------------------------------------------------------------------------
$("api-key").value = apiKey.get();
$("api-key").addEventListener("change", (event) => {
  apiKey.set(event.target.value.trim());
  loadLists();
});
$("speed").addEventListener("input", (event) => {
  $("speed-value").textContent = `${Number(event.target.value).toFixed(2)}×`;
});
$("model").addEventListener("change", () => {
  clearError();
  loadModel().catch(showError);
});
$("speak").addEventListener("click", speak);
$("stop").addEventListener("click", stop);
$("download").addEventListener("click", download);
document.body.dataset.ready = "true"; // the module ran (the test waits for it)
loadLists();
