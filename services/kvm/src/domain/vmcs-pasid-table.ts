/**
 * One entry of a VMCS PASID translation table: the guest PASID a vCPU's ENQCMD names, and the host
 * PASID (IOASID) the CPU puts in the descriptor instead.
 */
export interface PasidTranslation {
  /** Guest PASID (the IOASID's SPID). */
  readonly gpasid: number;
  /** Host PASID (the IOASID). */
  readonly hpasid: number;
  /** Generation of the host IOASID when the entry was installed. */
  readonly generation: number;
  /** Sequence number of the BIND event that installed the entry. */
  readonly bindSeq: bigint;
  /** When the entry was installed. */
  readonly installedAt: Date;
}

/** What {@link VmcsPasidTable.install} did. */
export type InstallOutcome =
  /** The entry is now in the table; `replaced` is the entry it displaced, if any. */
  | { readonly kind: "installed"; readonly replaced: readonly PasidTranslation[] }
  /** The same translation was already there (a redelivered BIND): nothing changed. */
  | { readonly kind: "unchanged" }
  /**
   * A later BIND already maps this guest PASID: the one being installed is older and dead (its
   * IOASID was unbound or freed before the later BIND could exist), so nothing changed.
   */
  | { readonly kind: "superseded"; readonly current: PasidTranslation };

/**
 * The per-VM VMCS PASID translation table KVM keeps for ENQCMD in the guest (ioasid.rst "KVM PASID
 * Translation Table Updates"): guest PASID → host PASID, consumed by the CPU when a vCPU executes
 * ENQCMD. Filled by BIND, emptied by UNBIND and FREE (the kernel's `vmcs_update_atomic()`).
 *
 * A guest PASID maps to at most one host PASID and a host PASID to at most one guest PASID (one
 * SPID per IOASID, unique within the set: DESIGN §3 "SPID"). Events of different IOASIDs may be
 * delivered out of order (DESIGN §4.2 orders them per IOASID only), so a BIND that moved guest
 * PASID 101 from host 201 to host 202 can arrive before the UNBIND of 201: entries carry the
 * sequence number of their BIND, the later BIND wins, and clearing names the host PASID (and
 * generation) so an UNBIND of 201 never removes the newer 101 → 202.
 *
 * Pure and synchronous: no I/O.
 */
export class VmcsPasidTable {
  readonly #byGpasid = new Map<number, PasidTranslation>();
  readonly #gpasidByHpasid = new Map<number, number>();

  /** Number of entries. */
  get size(): number {
    return this.#byGpasid.size;
  }

  /**
   * Installs gpasid → hpasid (step 7 of the guest life cycle, `vmcs_update_atomic()` on BIND).
   * Idempotent: the same translation again changes nothing. An entry of an older BIND for the
   * same guest PASID, or an older entry of the same host PASID, is replaced.
   */
  install(entry: PasidTranslation): InstallOutcome {
    const current = this.#byGpasid.get(entry.gpasid);
    if (current !== undefined) {
      if (current.hpasid === entry.hpasid && current.generation === entry.generation) return { kind: "unchanged" };
      if (current.bindSeq > entry.bindSeq) return { kind: "superseded", current };
    }
    const replaced: PasidTranslation[] = [];
    if (current !== undefined) replaced.push(this.#remove(current));
    const sameHost = this.#gpasidByHpasid.get(entry.hpasid);
    if (sameHost !== undefined) replaced.push(this.#remove(this.#byGpasid.get(sameHost)!));
    this.#byGpasid.set(entry.gpasid, entry);
    this.#gpasidByHpasid.set(entry.hpasid, entry.gpasid);
    return { kind: "installed", replaced };
  }

  /** The translation of a guest PASID, if the table has one (what ENQCMD consults). */
  translate(gpasid: number): PasidTranslation | undefined {
    return this.#byGpasid.get(gpasid);
  }

  /** The entry translating to a host PASID, if any. */
  findByHpasid(hpasid: number): PasidTranslation | undefined {
    const gpasid = this.#gpasidByHpasid.get(hpasid);
    return gpasid === undefined ? undefined : this.#byGpasid.get(gpasid);
  }

  /**
   * Removes the entry translating to `hpasid` at `generation` (`vmcs_update_atomic()` on UNBIND
   * and FREE). An entry of another generation is left alone: it belongs to another owner of the
   * same ID. Idempotent: nothing to remove returns undefined.
   * @returns the entry removed
   */
  clearHpasid(hpasid: number, generation: number): PasidTranslation | undefined {
    const entry = this.findByHpasid(hpasid);
    if (entry === undefined || entry.generation !== generation) return undefined;
    return this.#remove(entry);
  }

  /**
   * Removes every entry (VM destruction).
   * @returns the entries removed, ascending by guest PASID
   */
  clear(): PasidTranslation[] {
    const all = this.entries();
    this.#byGpasid.clear();
    this.#gpasidByHpasid.clear();
    return all;
  }

  /** Every entry, ascending by guest PASID. */
  entries(): PasidTranslation[] {
    return [...this.#byGpasid.values()].sort((a, b) => a.gpasid - b.gpasid);
  }

  #remove(entry: PasidTranslation): PasidTranslation {
    this.#byGpasid.delete(entry.gpasid);
    this.#gpasidByHpasid.delete(entry.hpasid);
    return entry;
  }
}
