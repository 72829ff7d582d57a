"""What an uploaded file really is: its type by magic bytes, and for a PDF whether it carries active content.

No I/O here: the callers feed bytes as they stream them (from the request or from storage), so the checks
run in flat memory whatever the file's size.
"""

from __future__ import annotations

import re
import zlib

from app.errors import DomainError


class TooLarge(DomainError):
    status_code = 413
    default_reason = "too_large"


class NotAllowed(DomainError):
    status_code = 415
    default_reason = "type_not_allowed"


# declared content type -> the family its bytes must show
FAMILIES: dict[str, str] = {
    "application/pdf": "pdf",
    "image/jpeg": "jpeg",
    "image/png": "png",
    "image/heic": "heif",
    "image/heif": "heif",
    "image/heic-sequence": "heif",
    "image/heif-sequence": "heif",
}
HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
SNIFF_BYTES = 64  # enough for every signature below (an ftyp box's first brands)


def family_of(content_type: str) -> str:
    """The declared type's family, or 415 type_not_allowed."""
    family = FAMILIES.get(content_type.split(";")[0].strip().lower())
    if family is None:
        raise NotAllowed("only PDF, JPEG, PNG and HEIC/HEIF files are accepted", "type_not_allowed")
    return family


def sniff(head: bytes) -> str | None:
    """The family the first bytes show, or None for anything else (an executable, a script, an archive)."""
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if len(head) >= 12 and head[4:8] == b"ftyp":
        box = int.from_bytes(head[:4], "big")
        brands = [head[8:12]] + [head[i:i + 4] for i in range(16, min(box, len(head)) - 3, 4)]
        if any(b in HEIF_BRANDS for b in brands):
            return "heif"
    return None


def check_type(head: bytes, declared: str) -> str:
    """The bytes must be an allowed type, and the one declared (a renamed executable, a PNG sent as a PDF:
    415 type_mismatch)."""
    family = family_of(declared)
    if sniff(head) != family:
        raise NotAllowed("the file's content is not of its declared type", "type_mismatch")
    return family


# --- PDF active content ---------------------------------------------------------------------------------------

# Names that make a PDF do something when opened or clicked rather than show pages. /OpenAction alone is not
# here: it usually only sets the first view; an action it runs is a /JavaScript, /Launch... found on its own.
ACTIVE_NAMES = frozenset({
    b"JavaScript", b"JS",  # scripts
    b"AA",  # additional actions: run on open, close, page view, field focus...
    b"Launch",  # start a program or open a file
    b"SubmitForm", b"ImportData",  # send form data out, pull data in
    b"GoToR", b"GoToE",  # jump into another (remote or embedded) document
    b"RichMedia", b"XFA",  # Flash/video players; XML forms with their own scripts
    b"EmbeddedFile", b"EmbeddedFiles",  # attachments (an executable inside a PDF)
})
ENCRYPT = b"Encrypt"
NAME = re.compile(rb"/([^\x00\t\n\x0c\r ()<>\[\]{}/%]*)")
HEX_ESCAPE = re.compile(rb"#([0-9A-Fa-f]{2})")
# what matters in the body between streams: names, comments and strings (whose content is not syntax), an
# object's start, and the start of a stream's data
TOKEN = re.compile(rb"%|\(|(?<![A-Za-z])obj(?![A-Za-z])|(?<![A-Za-z])stream(?:\r\n|\n|\r)|" + NAME.pattern)
STRING_TOKEN = re.compile(rb"\\.|[()]", re.DOTALL)
FILTER = re.compile(rb"/Filter\s*(?:/([^\s/\[\]<>()]+)|\[([^\]]*)\])")
# a stream's type or filters given by reference (`/Filter 9 0 R`) are resolved by readers, not by a scan: such a
# stream could be a compressed object stream this scanner would take for plain data
INDIRECT = re.compile(rb"/(?:Type|Subtype|Filter|DecodeParms)\s*\d+\s+\d+\s+R")
EOL = re.compile(rb"[\r\n]")
ENDSTREAM = b"endstream"
CARRY = 256  # bytes held back at a chunk's end: a name (127 at most) or a keyword may continue in the next one
DICT_MAX = 64 * 1024  # a stream's dictionary longer than this is not a real one
STEP = 256 * 1024  # inflated bytes per step: flat memory whatever the ratio


def decode_name(raw: bytes) -> bytes:
    """`/J#61vaScript` is `/JavaScript`: a name's #xx escapes decoded."""
    return HEX_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw) if b"#" in raw else raw


def unscannable(detail: str = "this PDF cannot be checked") -> NotAllowed:
    return NotAllowed(detail, "pdf_unscannable")


class PdfScanner:
    """Fed a PDF chunk by chunk; refuses (415) one with active content or encryption, in flat memory.

    It reads the body's syntax (names, strings, comments) and skips stream data, except object streams
    (`/Type /ObjStm`, where a file may pack its dictionaries, usually FlateDecode-compressed): those are
    inflated, with a cap on the inflated total, and their objects scanned as well. Names are compared with
    their #xx escapes decoded."""

    def __init__(self, inflate_cap: int, nested: bool = False) -> None:
        self.inflate_cap = inflate_cap
        self.nested = nested  # inside an object stream, where no stream may begin
        self.inflated = 0
        self._carry = b""
        self._mode = "body"  # body | string | comment | skip | inflate
        self._depth = 0  # of parentheses in a string
        self._dict: list[bytes] = []  # the body since the last `obj`: a stream's dictionary when `stream` comes
        self._dict_len = 0
        self._dict_overflow = False
        self._inflater: zlib._Decompress | None = None
        self._inner: PdfScanner | None = None  # scans what an object stream inflates to

    def feed(self, data: bytes, final: bool = False) -> None:
        buf = self._carry + data if self._carry else data
        self._carry = b""
        pos = 0
        while pos < len(buf):
            pos = getattr(self, f"_{self._mode}")(buf, pos, final)
            if pos < 0:  # more bytes needed: keep the rest for the next chunk
                self._carry = buf[-pos - 1:]
                return
        if final:
            if self._inner is not None:
                self._inner.feed(b"", final=True)
            if self._mode == "inflate":
                raise unscannable("this PDF ends inside an object stream")

    def finish(self) -> None:
        self.feed(b"", final=True)

    def _names(self, token: bytes) -> None:
        name = decode_name(token[1:])
        if name in ACTIVE_NAMES:
            raise NotAllowed("PDF files with scripts or actions are not accepted", "pdf_active_content")
        if name == ENCRYPT:
            raise NotAllowed("encrypted PDF files are not accepted", "pdf_encrypted")

    def _remember(self, text: bytes) -> None:
        if not text or self._dict_overflow:
            return
        self._dict.append(text)
        self._dict_len += len(text)
        if self._dict_len > DICT_MAX:
            self._dict, self._dict_len, self._dict_overflow = [], 0, True

    def _forget(self) -> None:
        self._dict, self._dict_len, self._dict_overflow = [], 0, False

    def _body(self, buf: bytes, pos: int, final: bool) -> int:
        safe_end = len(buf) if final else max(pos, len(buf) - CARRY)
        for m in TOKEN.finditer(buf, pos):
            if not final and (m.start() >= safe_end or m.end() >= len(buf)):
                self._remember(buf[pos:m.start()])  # this token may continue in the next chunk
                return -(m.start() + 1)
            token = m.group(0)
            if token == b"%" or token == b"(":
                self._remember(buf[pos:m.start()])
                self._mode, self._depth = ("comment", 0) if token == b"%" else ("string", 1)
                return m.end()
            if token == b"obj":
                self._forget()
                pos = m.end()
            elif token.startswith(b"stream"):
                self._remember(buf[pos:m.start()])
                self._start_stream()
                return m.end()
            else:
                self._names(token)
        self._remember(buf[pos:safe_end])
        return -(safe_end + 1) if safe_end < len(buf) else len(buf)

    def _start_stream(self) -> None:
        if self._dict_overflow or self.nested:
            raise unscannable()
        dictionary = decode_name(b"".join(self._dict))
        self._forget()
        if INDIRECT.search(dictionary):
            raise unscannable()
        self._mode = "skip"
        if b"/ObjStm" not in dictionary:
            return
        found = FILTER.search(dictionary)
        filters = ([] if found is None else
                   [found.group(1)] if found.group(1) else re.findall(rb"/([^\s/]+)", found.group(2)))
        if not filters:
            self._mode = "body"  # an uncompressed object stream: its objects are plain syntax
        elif filters == [b"FlateDecode"] and b"/DecodeParms" not in dictionary:
            self._mode, self._inflater, self._inner = "inflate", zlib.decompressobj(), PdfScanner(0, nested=True)
        else:
            raise unscannable()

    def _string(self, buf: bytes, pos: int, final: bool) -> int:
        consumed = pos
        for m in STRING_TOKEN.finditer(buf, pos):
            consumed = m.end()
            if m.group(0) == b"(":
                self._depth += 1
            elif m.group(0) == b")":
                self._depth -= 1
                if self._depth == 0:
                    self._mode = "body"
                    return m.end()
        if not final and buf.endswith(b"\\") and len(buf) - 1 >= consumed:  # an escape cut in two
            return -len(buf)
        return len(buf)

    def _comment(self, buf: bytes, pos: int, final: bool) -> int:
        m = EOL.search(buf, pos)
        if m is None:
            return len(buf)
        self._mode = "body"
        return m.end()

    def _skip(self, buf: bytes, pos: int, final: bool) -> int:
        at = buf.find(ENDSTREAM, pos)
        if at < 0:  # keep what may be the keyword's beginning
            keep = max(pos, len(buf) - len(ENDSTREAM) + 1)
            return -(keep + 1) if not final else len(buf)
        self._mode = "body"
        return at + len(ENDSTREAM)

    def _inflate(self, buf: bytes, pos: int, final: bool) -> int:
        inflater, inner = self._inflater, self._inner
        assert inflater is not None
        assert inner is not None
        data = buf[pos:]
        try:
            while data and not inflater.eof:
                out = inflater.decompress(data, STEP)
                data = inflater.unconsumed_tail
                self.inflated += len(out)
                if self.inflated > self.inflate_cap:
                    raise unscannable("this PDF inflates beyond what is checked")
                inner.feed(out)
        except zlib.error as exc:
            raise unscannable() from exc
        if not inflater.eof:
            return len(buf)
        inner.finish()
        self._inflater, self._inner, self._mode = None, None, "skip"
        return len(buf) - len(inflater.unused_data)  # the rest of this chunk: `endstream` and what follows
