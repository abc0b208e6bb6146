"""Shrinks a CUDA library for one GPU architecture: zeroes the payloads of the embedded
fatbinary entries built for other architectures (the headers stay, so the runtime still finds
and loads the entry for the card; zeroed bytes compress to nothing). ONNX Runtime's CUDA
provider (284 MB) carries cubins for sm_75..sm_120 and no PTX; trimmed for sm_90 and xz'd it
fits the device tool's 64 MiB transfer (scripts/gpu/README.md).

    python3 trim_fatbin.py LIB.so OUT.so --keep 90     # prints what was kept and zeroed
    python3 trim_fatbin.py LIB.so --list               # the entries, nothing written

Fatbinary layout (NVIDIA's fatbinary format as read by cuobjdump): a 16-byte header
(magic 0xBA55ED50, u16 version, u16 header size, u64 size of the entries), then entries, each a
header (u16 kind: 1 PTX, 2 cubin; u16; u32 header size; u64 payload size; ...; u32 arch at
byte 28) followed by its payload. A region that does not parse as exactly that (sizes adding up
to the declared total) is left untouched.
"""

import argparse
import struct
import sys
from pathlib import Path

MAGIC = 0xBA55ED50
KINDS = {1: "ptx", 2: "cubin"}


def regions(data: bytes):
    """Yields (offset, [entries]) for each well-formed fatbinary in `data`; an entry is
    (header offset, header size, payload size, kind, arch)."""
    magic = struct.pack("<I", MAGIC)
    pos = data.find(magic)
    while pos != -1:
        entries = parse(data, pos)
        if entries is not None:
            yield pos, entries
        pos = data.find(magic, pos + 4)


def parse(data: bytes, pos: int):
    if pos + 16 > len(data):
        return None
    _, version, header_size, total = struct.unpack_from("<IHHQ", data, pos)
    if header_size != 16 or version != 1 or total == 0 or pos + 16 + total > len(data):
        return None
    entries, at, end = [], pos + 16, pos + 16 + total
    while at < end:
        if at + 32 > end:
            return None
        kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, at)
        arch = struct.unpack_from("<I", data, at + 28)[0]
        if kind not in KINDS or entry_header < 32 or at + entry_header + payload > end:
            return None
        entries.append((at, entry_header, payload, kind, arch))
        at += entry_header + payload
    return entries if at == end else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("lib", type=Path)
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--keep", type=int, action="append", default=[], help="architecture to keep, e.g. 90 (repeatable)")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    data = bytearray(args.lib.read_bytes())
    found = list(regions(bytes(data)))
    kept = zeroed = 0
    archs: dict[tuple[str, int], int] = {}
    for _, entries in found:
        for at, header, payload, kind, arch in entries:
            archs[(KINDS[kind], arch)] = archs.get((KINDS[kind], arch), 0) + payload
            if args.list or not args.keep:
                continue
            # PTX is kept whatever its target: the driver may JIT it for the card.
            if kind == 2 and arch not in args.keep:
                data[at + header:at + header + payload] = bytes(payload)
                zeroed += payload
            else:
                kept += payload
    print(f"{len(found)} fatbinaries; payload bytes by (kind, arch): "
          + ", ".join(f"{k}_{a}: {n}" for (k, a), n in sorted(archs.items())))
    if args.list:
        return 0
    if not args.keep or args.out is None:
        ap.error("give OUT and --keep ARCH (or --list)")
    if not any(arch in args.keep for (kind, arch) in archs if kind == "cubin"):
        print(f"no cubin for {args.keep}: refusing to write a library that could not run", file=sys.stderr)
        return 1
    args.out.write_bytes(bytes(data))
    print(f"kept {kept} payload bytes, zeroed {zeroed} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
