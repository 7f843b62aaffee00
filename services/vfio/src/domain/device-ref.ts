/** A device a VM can be given: a physical PCI function (by its IOMMU device id) or an mdev (by UUID). */
export type DeviceRef = { readonly kind: "device"; readonly id: string } | { readonly kind: "mdev"; readonly id: string };

/** Longest device id or mdev UUID accepted, in characters. */
export const MAX_DEVICE_NAME = 256;

/** Key of a device in VFIO's tables: kinds never collide. */
export function deviceKey(ref: DeviceRef): string {
  return `${ref.kind}:${ref.id}`;
}

/** `device 0000:6a:01.0` / `mdev 6f0c…`, for messages and history. */
export function describeDevice(ref: DeviceRef): string {
  return `${ref.kind} ${ref.id}`;
}
