import { BinaryWriter } from "@bufbuild/protobuf/wire";

/**
 * One protobuf writer reused for every encoding on a hot path. A new `BinaryWriter` allocates a
 * 128-byte buffer at its first write and grows it by copying; profiled at 1,000 IOASIDs in flight
 * (issue 15), that allocation was a visible share of the core's and the subscriber's time per event
 * and of the garbage. `finish()` copies out what was written and starts the writer over on the same
 * buffer, so the bytes returned are the caller's own; the buffer stays as large as the largest
 * encoding (about twice it at most) for the life of the process. An encoding that throws leaves the
 * writer half written: it is replaced, never reused. An encoding started inside another (a `write`
 * that encodes through the same ReusedWriter) gets a writer of its own.
 */
export class ReusedWriter {
  #writer = new BinaryWriter();
  #busy = false;

  /** The bytes `write` puts into the writer. */
  encode(write: (w: BinaryWriter) => BinaryWriter): Uint8Array {
    if (this.#busy) return write(new BinaryWriter()).finish();
    this.#busy = true;
    try {
      return write(this.#writer).finish();
    } catch (err) {
      this.#writer = new BinaryWriter();
      throw err;
    } finally {
      this.#busy = false;
    }
  }
}
