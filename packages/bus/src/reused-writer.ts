import { BinaryWriter } from "@bufbuild/protobuf/wire";

/**
 * One protobuf writer reused for every encoding on a hot path. `new BinaryWriter()` starts with
 * a fresh 128-byte buffer and grows it by copying; profiled at 1,000 IOASIDs in flight (issue 15),
 * that allocation was a visible share of the core's and the subscriber's time per event and of the
 * garbage. `finish()` copies out what was written and starts the writer over on the same buffer,
 * so the bytes returned are the caller's own. An encoding that throws leaves the writer half
 * written: it is replaced, never reused.
 */
export class ReusedWriter {
  #writer = new BinaryWriter();

  /** The bytes `write` puts into the writer. */
  encode(write: (w: BinaryWriter) => BinaryWriter): Uint8Array {
    try {
      return write(this.#writer).finish();
    } catch (err) {
      this.#writer = new BinaryWriter();
      throw err;
    }
  }
}
