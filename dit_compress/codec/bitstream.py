"""The `.ditc` file: a self-describing container for a compressed image.

    magic "DITC" | version (u8) | header length (u32) | header (UTF-8 JSON)
    | stream count (u8) | per stream: length (u32) + bytes | CRC-32 of everything before (u32)

The header names the image shape, the latent and hyper-latent shapes, the codec's id and
weights hash, and its rate-distortion lambda. A truncated file, a flipped bit, or a file
written by another codec fails with an error that says which.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

from ..errors import DitcError
from ..fileio import parse_json

MAGIC = b"DITC"
VERSION = 1


class BitstreamError(DitcError):
    """A compressed file that cannot be decoded: truncated, corrupt, or from another codec."""


@dataclass(frozen=True)
class Bitstream:
    header: dict
    streams: tuple[bytes, ...]

    def to_bytes(self) -> bytes:
        header = json.dumps(self.header, sort_keys=True, separators=(",", ":")).encode()
        parts = [MAGIC, struct.pack("<BI", VERSION, len(header)), header, struct.pack("<B", len(self.streams))]
        for s in self.streams:
            parts += [struct.pack("<I", len(s)), s]
        body = b"".join(parts)
        return body + struct.pack("<I", zlib.crc32(body))

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "input") -> "Bitstream":
        if len(data) < 4 or data[:4] != MAGIC:
            raise BitstreamError(f"{where}: not a dit_compress codec file (bad magic)")
        if len(data) < 14:
            raise BitstreamError(f"{where}: truncated ({len(data)} bytes)")
        body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
        version, header_len = struct.unpack_from("<BI", data, 4)
        if version != VERSION:
            raise BitstreamError(f"{where}: format version {version}, this decoder reads version {VERSION}")
        pos = 9 + header_len
        if pos + 1 > len(body):
            raise BitstreamError(f"{where}: truncated inside the header")
        streams, (count,) = [], struct.unpack_from("<B", body, pos)
        pos += 1
        for i in range(count):
            if pos + 4 > len(body):
                raise BitstreamError(f"{where}: truncated before stream {i}")
            (n,) = struct.unpack_from("<I", body, pos)
            if pos + 4 + n > len(body):
                raise BitstreamError(f"{where}: truncated inside stream {i} ({len(body) - pos - 4} of {n} bytes)")
            streams.append(body[pos + 4:pos + 4 + n])
            pos += 4 + n
        if pos != len(body):
            raise BitstreamError(f"{where}: {len(body) - pos} unexpected bytes after the last stream")
        if zlib.crc32(body) != crc:
            raise BitstreamError(f"{where}: checksum mismatch (the file is corrupt)")
        header = parse_json(body[9:9 + header_len], f"{where}: header", "codec header", BitstreamError)
        return cls(header, tuple(streams))
