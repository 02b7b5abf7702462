"""A minimal NBD client (fixed newstyle handshake, NBD_OPT_GO, simple
replies): what a backup tool's transport library does to read a snapshot's
disk over the host's NBD export. Standard library only."""

import socket
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
FLAG_FIXED_NEWSTYLE = 1
FLAG_C_FIXED_NEWSTYLE = 1
MAX_REQUEST = 32 << 20


class NbdError(Exception):
    pass


class Nbd:
    """One export, opened read/write or read-only as the server allows."""

    def __init__(self, host, port, export):
        self.sock = socket.create_connection((host, port), timeout=60)
        self.handle = 0
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError("not a fixed newstyle NBD server")
        self.sock.sendall(struct.pack(">I", FLAG_C_FIXED_NEWSTYLE))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        self.size = None
        while True:
            magic, opt, rep, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length)
            if magic != OPT_REPLY_MAGIC:
                raise NbdError("bad option reply")
            if rep == REP_ACK:
                break
            if rep == REP_INFO and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                self.size, self.flags = struct.unpack(">QH", payload[2:12])
            elif rep & 0x80000000:
                raise NbdError("export %r refused: %s (error %#x)" % (export, payload[4:].decode(errors="replace"), rep))
        if self.size is None:
            raise NbdError("no export size")

    def _recv(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise NbdError("connection closed")
            buf += chunk
        return bytes(buf)

    def _request(self, cmd, offset, length, data=b""):
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self.handle, offset, length) + data)
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self.handle:
            raise NbdError("bad reply")
        if error:
            raise NbdError("NBD error %d at %d+%d" % (error, offset, length))

    def pread(self, offset, length):
        out = bytearray()
        while length > 0:
            n = min(length, MAX_REQUEST)
            self._request(CMD_READ, offset, n)
            out += self._recv(n)
            offset += n
            length -= n
        return bytes(out)

    def pwrite(self, offset, data):
        self._request(CMD_WRITE, offset, len(data), data)

    def close(self):
        try:
            self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        finally:
            self.sock.close()
