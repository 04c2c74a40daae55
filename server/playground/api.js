// The server's API, by URLs relative to the page (so it works behind a path prefix).

const KEY = "spectts.apiKey";

// The API key lives in sessionStorage: this tab only, gone when it closes.
export const apiKey = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (value) => (value ? sessionStorage.setItem(KEY, value) : sessionStorage.removeItem(KEY)),
};

// An error as the API words it: {message, type, param, code}, and Retry-After (seconds) if sent.
export class ApiError extends Error {
  constructor(error, retryAfter = null) {
    super(error.message);
    this.error = error;
    this.retryAfter = retryAfter;
  }
}

const url = (path) => new URL(path, document.baseURI);

function headers(json = false) {
  const out = json ? { "Content-Type": "application/json" } : {};
  const key = apiKey.get();
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function failure(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not the API's JSON (a proxy's page): say the status
  }
  error ||= { message: `${response.status} ${response.statusText}`, code: null };
  const retry = response.headers.get("Retry-After");
  return new ApiError(error, retry === null ? null : Number(retry));
}

export async function getJSON(path) {
  const response = await fetch(url(path), { headers: headers() });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// POST v1/audio/speech: the whole WAV file as a Blob.
export async function speechFile(body) {
  const response = await fetch(url("v1/audio/speech"), {
    method: "POST", headers: headers(true), body: JSON.stringify({ ...body, response_format: "wav" }),
  });
  if (!response.ok) throw await failure(response);
  return response.blob();
}

// base64url without padding: a WebSocket subprotocol may only hold token characters.
function base64url(text) {
  const bytes = new TextEncoder().encode(text);
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

// One session on the WebSocket v1/audio/speech/stream: session.config, the text, input.done.
// `on`: queued(session.queued: waiting for a stream, at message.position), start(audio.start),
// audio(Int16Array), sentence(audio.done), done(session.done),
// error(ApiError), closed(CloseEvent) when the socket ends without session.done.
// The first error ends the session (closing the socket stops its generation on the server).
export function openSession({ config, text, on }) {
  const address = url("v1/audio/speech/stream");
  address.protocol = address.protocol === "https:" ? "wss:" : "ws:";
  const key = apiKey.get();
  // browsers cannot set an Authorization header on a WebSocket: the key travels as a subprotocol
  const ws = new WebSocket(address, key ? ["spectts", `spectts.bearer.${base64url(key)}`] : []);
  ws.binaryType = "arraybuffer";
  let over = false;
  const finish = () => {
    over = true;
    ws.close(1000);
  };
  const send = (message) => ws.send(JSON.stringify(message));
  ws.onopen = () => {
    send({ type: "session.config", ...config });
    send({ type: "input.text", text });
    send({ type: "input.done" });
  };
  ws.onmessage = (event) => {
    if (over) return;
    if (typeof event.data !== "string") {
      on.audio(new Int16Array(event.data)); // PCM16 LE mono
      return;
    }
    const message = JSON.parse(event.data);
    if (message.type === "session.queued") on.queued(message);
    else if (message.type === "audio.start") on.start(message);
    else if (message.type === "audio.done") on.sentence(message);
    else if (message.type === "session.done") {
      finish();
      on.done(message);
    } else if (message.type === "error") {
      finish();
      on.error(new ApiError(message.error, message.retry_after ?? null));
    }
  };
  ws.onclose = (event) => {
    if (!over) {
      over = true;
      on.closed(event);
    }
  };
  return {
    cancel() {
      if (ws.readyState === WebSocket.OPEN && !over) send({ type: "cancel" });
    },
  };
}
