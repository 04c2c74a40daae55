// The session's waveform, drawn as audio arrives: the peaks of each 5 ms, played part highlighted.

const BUCKETS_PER_SECOND = 200;
const MIN_SPAN = 4; // seconds the canvas shows at least (it then grows with the audio)

export class Waveform {
  constructor(canvas, sampleRate) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d");
    this.reset(sampleRate);
  }

  reset(sampleRate) {
    this.sampleRate = sampleRate;
    this.perBucket = Math.round(sampleRate / BUCKETS_PER_SECOND);
    this.peaks = []; // |sample| max per bucket, 0..1
    this.partial = 0; // samples in the last, unfinished bucket
  }

  add(pcm) {
    for (let i = 0; i < pcm.length; i++) {
      if (this.partial === 0) this.peaks.push(0);
      const last = this.peaks.length - 1;
      this.peaks[last] = Math.max(this.peaks[last], Math.abs(pcm[i]) / 32768);
      this.partial = (this.partial + 1) % this.perBucket;
    }
  }

  draw(playedSeconds) {
    const { canvas, context: g } = this;
    const style = getComputedStyle(canvas);
    const [w, h] = [canvas.width, canvas.height];
    g.clearRect(0, 0, w, h);
    g.fillStyle = style.getPropertyValue("--grid");
    g.fillRect(0, h / 2, w, 1);
    const seconds = this.peaks.length / BUCKETS_PER_SECOND;
    const span = Math.max(MIN_SPAN, seconds);
    const perColumn = (span * BUCKETS_PER_SECOND) / w; // buckets per pixel column
    const playedColumn = (playedSeconds / span) * w;
    for (let x = 0; x < w; x++) {
      const from = Math.floor(x * perColumn);
      if (from >= this.peaks.length) break;
      const to = Math.max(from + 1, Math.floor((x + 1) * perColumn));
      let peak = 0;
      for (let b = from; b < to && b < this.peaks.length; b++) peak = Math.max(peak, this.peaks[b]);
      const half = Math.max(1, peak * (h / 2 - 4));
      g.fillStyle = style.getPropertyValue(x < playedColumn ? "--played" : "--received");
      g.fillRect(x, h / 2 - half, 1, 2 * half);
    }
    if (playedSeconds > 0) {
      g.fillStyle = style.getPropertyValue("--playhead");
      g.fillRect(Math.min(w - 2, playedColumn), 0, 2, h);
    }
  }
}
