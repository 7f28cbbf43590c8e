#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/seeds/<target>/ (deterministic).

Run from anywhere: python3 fuzz/seeds/make-seeds.py. The seeds are valid protocol
conversations that let the fuzzer start from deep inside the server instead of having
to discover the magics first; see the layout notes at the top of each fuzz target.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
IHAVEOPT = 0x49484156454F5054
REQ, EXT_REQ = 0x25609513, 0x21E41C71
OPT = dict(EXPORT_NAME=1, ABORT=2, LIST=3, STARTTLS=5, INFO=6, GO=7, STRUCTURED_REPLY=8,
           LIST_META=9, SET_META=10, EXTENDED_HEADERS=11)
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO, PAYLOAD_LEN = 1, 2, 4, 8, 16, 32


def string(s):
    b = s.encode()
    return struct.pack(">I", len(b)) + b


def option(o, data=b""):
    return struct.pack(">QII", IHAVEOPT, o, len(data)) + data


def info_req(name, items=(1, 2, 3)):
    return string(name) + struct.pack(">H", len(items)) + b"".join(struct.pack(">H", i) for i in items)


def meta_req(name, queries):
    return string(name) + struct.pack(">I", len(queries)) + b"".join(string(q) for q in queries)


def req(cmd, offset=0, length=0, flags=0, cookie=1, ext=False):
    if ext:
        return struct.pack(">IHHQQQ", EXT_REQ, flags, cmd, cookie, offset, length)
    return struct.pack(">IHHQQI", REQ, flags, cmd, cookie, offset, length)


def workload(ext):
    out = req(READ, 0, 4096, ext=ext)
    out += req(READ, 4096, 8192, DF, 2, ext)
    out += req(WRITE, 8192, 512, FUA, 3, ext) + bytes(range(256)) * 2
    out += req(FLUSH, cookie=4, ext=ext)
    out += req(TRIM, 0, 4096, cookie=5, ext=ext)
    out += req(WZ, 4096, 4096, NO_HOLE, 6, ext)
    out += req(WZ, 4096, 4096, FAST_ZERO, 7, ext)
    out += req(CACHE, 0, 65536, cookie=8, ext=ext)
    out += req(BS, 0, 1 << 20, cookie=9, ext=ext)
    out += req(BS, 0, 1 << 20, REQ_ONE, 10, ext)
    out += req(READ, 1 << 19, 4096, cookie=11, ext=ext)  # the export's failing region
    out += req(READ, (1 << 20) - 512, 1024, cookie=12, ext=ext)  # past the end
    out += req(WRITE, 1 << 20, 512, cookie=13, ext=ext) + b"\xee" * 512  # refused, skipped
    if ext:
        out += req(BS, 0, 12, PAYLOAD_LEN, 14, True) + struct.pack(">QI", 65536, 0)
        out += req(WRITE, 0, 512, PAYLOAD_LEN, 15, True) + b"\x11" * 512
    out += req(DISC, ext=ext)
    return out


def record(ctl, cmd, flags, offset, length):
    return struct.pack(">BBHII", ctl, cmd, flags, offset, length)


def write(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


flags = struct.pack(">I", 3)

# session: first byte selects the prelude (see fuzz_targets/session.rs).
structured = flags + option(OPT["STRUCTURED_REPLY"]) + option(OPT["SET_META"], meta_req("", ["base:allocation"])) + option(OPT["GO"], info_req(""))
write("session", "raw-structured", b"\x00" + structured + workload(False))
extended = flags + option(OPT["EXTENDED_HEADERS"]) + option(OPT["SET_META"], meta_req("disk", ["base:allocation"])) + option(OPT["GO"], info_req("disk"))
write("session", "raw-extended", b"\x00" + extended + workload(True))
simple = flags + option(OPT["GO"], info_req("")) 
write("session", "raw-simple", b"\x00" + simple + workload(False))
haggle = (flags + option(OPT["LIST"]) + option(OPT["INFO"], info_req("ro")) + option(OPT["STARTTLS"])
          + option(OPT["LIST_META"], meta_req("ro", ["base:", "qemu:"])) + option(99, b"xyz")
          + option(OPT["GO"], info_req("nope")) + option(OPT["STRUCTURED_REPLY"]) + option(OPT["STRUCTURED_REPLY"])
          + option(OPT["EXTENDED_HEADERS"]) + option(OPT["SET_META"], meta_req("ro", ["base:allocation", "qemu:dirty-bitmap:fuzz"]))
          + option(OPT["GO"], info_req("ro")) + workload(True))
write("session", "raw-haggle", b"\x00" + haggle)
write("session", "raw-abort", b"\x00" + flags + option(OPT["LIST"]) + option(OPT["ABORT"]))
write("session", "raw-oldstyle-export-name", b"\x00" + struct.pack(">I", 0) + option(OPT["EXPORT_NAME"], b"disk") + workload(False))
write("session", "prelude-structured-raw", b"\x04" + workload(False))
write("session", "prelude-extended-raw", b"\x05" + workload(True))
write("session", "prelude-export-name-raw", b"\x02" + workload(False))
# Records (ctl, command, flags, offset, length); truthful ones let the reply oracle run.
records = (record(4, READ, 0, 0, 8) + record(5, WRITE, FUA, 16, 1) + record(5, BS, 0, 0, 2048)
           + record(5, WZ, NO_HOLE | FAST_ZERO, 8, 8) + record(5, TRIM, 0, 8, 8) + record(5, READ, DF, 0, 64)
           + record(5, READ, 0, 1024, 16) + record(5, BS, REQ_ONE, 0, 2048) + record(0, FLUSH, 0, 0, 0)
           + record(5, CACHE, 0, 0, 8) + record(0, READ, 0, 1 << 20, 512) + record(64, 200, 0, 0, 0))
lie = record(16 | 4, WRITE, 0, 0, 1)
write("session", "records-structured", b"\x14" + records)
write("session", "records-structured-ro", b"\x1c" + records)
write("session", "records-simple", b"\x11" + records)
write("session", "records-export-name", b"\x12" + records)
write("session", "records-haggle", b"\x17" + records)
write("session", "records-extended", b"\x15" + records + record(0, BS, PAYLOAD_LEN, 0, 12))
write("session", "records-extended-ro", b"\x1d" + records + record(4, BS, PAYLOAD_LEN, 0, 0) + record(0, BS, PAYLOAD_LEN, 0, 16))
write("session", "records-lie", b"\x14" + records + lie + records)
write("session", "records-shutdown", b"\x34" + records * 4)

# options: u32 option number, then its data.
write("options", "go", struct.pack(">I", OPT["GO"]) + info_req("disk"))
write("options", "set-meta", struct.pack(">I", OPT["SET_META"]) + meta_req("disk", ["base:allocation", "qemu:"]))
write("options", "stream", b"\0\0\0\0" + structured[4:] + option(OPT["EXPORT_NAME"], b"disk"))

# requests: 6 selector bytes, a 32-byte header, then a block-status payload.
sel = bytes([5, 3, 4, 0x7E, 2, 1])
write("requests", "read", sel + req(READ, 4096, 4096, ext=True))
write("requests", "write", sel + req(WRITE, 0, 512, FUA, ext=True))
write("requests", "block-status-payload", sel + req(BS, 0, 12, PAYLOAD_LEN, ext=True) + struct.pack(">QI", 4096, 0))
write("requests", "compact-write", bytes([5, 3, 4, 0x7E, 1, 1]) + req(WRITE, 0, 512) + b"\0\0\0\0")

# client_replies: 1 selector byte (command, structured, context), offset, length, context
# id, then records: 0x00/0x02 + an option reply (GO/SET_META), 0x01 + a transmission reply.
REP = dict(ACK=1, INFO=3, META_CONTEXT=4)
OPTION_REPLY_MAGIC, SIMPLE_MAGIC, CHUNK_MAGIC = 0x0003E889045565A9, 0x67446698, 0x668E33EF
DONE, R_DATA, R_HOLE, R_BS, R_ERROR_OFFSET = 1, 1, 2, 5, (1 << 15) | 2


def client(sel, offset, length, ctx=1):
    return struct.pack(">BQII", sel, offset, length, ctx)


def option_reply(tag, o, kind, data=b""):
    return bytes([tag]) + struct.pack(">QIII", OPTION_REPLY_MAGIC, o, kind, len(data)) + data


def chunk_reply(flags, kind, payload, cookie=0):
    return b"\x01" + struct.pack(">IHHQI", CHUNK_MAGIC, flags, kind, cookie, len(payload)) + payload


haggle = (option_reply(0, OPT["GO"], REP["INFO"], struct.pack(">HQH", 0, 1 << 20, 1))
          + option_reply(0, OPT["GO"], REP["INFO"], struct.pack(">HIII", 3, 512, 4096, 1 << 20))
          + option_reply(0, OPT["GO"], REP["ACK"])
          + option_reply(2, OPT["SET_META"], REP["META_CONTEXT"], struct.pack(">I", 1) + b"base:allocation"))
write("client_replies", "read-structured", client(0x0C, 4096, 8192) + haggle
      + chunk_reply(0, R_DATA, struct.pack(">Q", 4096) + bytes(range(256)) * 16)
      + chunk_reply(DONE, R_HOLE, struct.pack(">QI", 8192, 4096)))
write("client_replies", "read-simple", client(0x00, 0, 512) + b"\x01"
      + struct.pack(">IIQ", SIMPLE_MAGIC, 0, 0) + b"\xab" * 512)
write("client_replies", "block-status", client(0x0D, 0, 1 << 20)
      + chunk_reply(DONE, R_BS, struct.pack(">IIIII", 1, 4096, 0, 1 << 20, 3)))
write("client_replies", "error-offset", client(0x0C, 0, 4096)
      + chunk_reply(DONE, R_ERROR_OFFSET, struct.pack(">IH", 5, 3) + b"bad" + struct.pack(">Q", 512)))
