// Gapless playback of PCM chunks as they arrive: each chunk is an AudioBuffer scheduled to start
// where the previous one ends (an AudioWorklet would need a secure context: plain http on a LAN
// address is not one). The context runs at the voice's sample rate, so chunks are not resampled
// one by one (the output device resamples the one stream).

const LEAD = 0.05; // seconds between the first chunk's arrival and its start (and after a stall)

export class Player {
  constructor(sampleRate) {
    this.context = new AudioContext({ sampleRate, latencyHint: "interactive" });
    this.sampleRate = sampleRate;
    this.analyser = this.context.createAnalyser();
    this.analyser.fftSize = 1024;
    this.analyser.connect(this.context.destination);
    this.samples = new Float32Array(this.analyser.fftSize);
    this.sources = new Set();
    [this.scheduled, this.playedMax] = [0, 0];
    this.reset();
  }

  // A new session: nothing scheduled, nothing played.
  reset() {
    this.stop();
    this.scheduled = 0; // seconds of audio given to push
    this.started = null; // context time of the first chunk's start
    this.playedMax = 0;
  }

  async resume() {
    if (this.context.state !== "running") await this.context.resume();
  }

  push(pcm) {
    const audio = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) audio[i] = pcm[i] / 32768;
    const buffer = this.context.createBuffer(1, audio.length, this.sampleRate);
    buffer.copyToChannel(audio, 0);
    const source = this.context.createBufferSource();
    source.buffer = buffer;
    source.connect(this.analyser);
    const now = this.context.currentTime;
    let at = this.next;
    if (this.started === null || at < now) at = now + LEAD; // the first chunk, or after a stall
    this.started ??= at;
    source.start(at);
    this.next = at + buffer.duration;
    this.scheduled += buffer.duration;
    this.sources.add(source);
    source.onended = () => this.sources.delete(source);
  }

  // Stop what is playing and drop what is scheduled.
  stop() {
    const played = this.played;
    for (const source of this.sources) {
      source.onended = null;
      source.stop();
      source.disconnect();
    }
    this.sources.clear();
    this.next = this.context.currentTime;
    this.scheduled = played; // what was dropped was never played
  }

  get playing() {
    return this.sources.size > 0;
  }

  // Seconds scheduled but not yet played.
  get buffered() {
    return this.sources.size ? Math.max(0, this.next - this.context.currentTime) : 0;
  }

  // Seconds of this session's audio played so far (by the context's clock).
  get played() {
    // after a stall the new chunk waits LEAD: never let the count step back
    this.playedMax = Math.max(this.playedMax, this.scheduled - this.buffered);
    return this.playedMax;
  }

  // The output's RMS level, 0..1.
  level() {
    this.analyser.getFloatTimeDomainData(this.samples);
    let sum = 0;
    for (const s of this.samples) sum += s * s;
    return Math.sqrt(sum / this.samples.length);
  }
}
