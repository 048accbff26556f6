// Jitter-buffered player for one reply at a time.
//
// Messages in:  {type: "audio", rid, pcm: ArrayBuffer (Int16)}  queue samples of reply `rid`
//               {type: "end", rid}                               no more audio: play out what is left
//               {type: "flush"}                                  stop now and drop everything queued
// Messages out: {type: "progress", rid, played, buffered, drained}  every PROGRESS_S while playing and
//               once when a finished reply has drained; `played` counts samples actually output
//               {type: "flushed", rid, played, dropped}          answer to "flush"
//
// A reply starts (and restarts after an underrun) only once PREBUFFER_S of audio is queued, unless
// its end has been announced, so network jitter becomes a short delay rather than crackle.

const PREBUFFER_S = 0.12;
const PROGRESS_S = 0.1;

class PlayerProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.reset(null);
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  reset(rid) {
    this.rid = rid;
    this.chunks = [];
    this.offset = 0; // read position in chunks[0]
    this.buffered = 0;
    this.played = 0;
    this.playing = false;
    this.ended = false;
    this.drainedSent = false;
    this.sinceReport = 0;
  }

  onMessage(msg) {
    if (msg.type === "audio") {
      if (msg.rid !== this.rid) this.reset(msg.rid);
      const ints = new Int16Array(msg.pcm);
      const floats = new Float32Array(ints.length);
      for (let i = 0; i < ints.length; i++) floats[i] = ints[i] / 32768;
      this.chunks.push(floats);
      this.buffered += floats.length;
    } else if (msg.type === "end") {
      if (msg.rid === this.rid) this.ended = true;
    } else if (msg.type === "flush") {
      const dropped = this.buffered;
      this.port.postMessage({ type: "flushed", rid: this.rid, played: this.played, dropped });
      this.reset(null);
    }
  }

  process(inputs, outputs) {
    const out = outputs[0][0];
    out.fill(0);
    if (this.rid === null) return true;
    if (!this.playing && (this.buffered >= PREBUFFER_S * sampleRate || (this.ended && this.buffered > 0))) {
      this.playing = true;
    }
    let n = 0;
    while (this.playing && n < out.length && this.chunks.length) {
      const chunk = this.chunks[0];
      const take = Math.min(out.length - n, chunk.length - this.offset);
      out.set(chunk.subarray(this.offset, this.offset + take), n);
      n += take;
      this.offset += take;
      if (this.offset === chunk.length) {
        this.chunks.shift();
        this.offset = 0;
      }
    }
    this.buffered -= n;
    this.played += n;
    if (this.buffered === 0) this.playing = false; // underrun or done: prebuffer again
    this.sinceReport += n;
    const drained = this.ended && this.buffered === 0;
    if ((n > 0 && this.sinceReport >= PROGRESS_S * sampleRate) || (drained && !this.drainedSent)) {
      this.port.postMessage({ type: "progress", rid: this.rid, played: this.played, buffered: this.buffered, drained });
      this.sinceReport = 0;
      this.drainedSent = drained;
    }
    return true;
  }
}

registerProcessor("player", PlayerProcessor);
