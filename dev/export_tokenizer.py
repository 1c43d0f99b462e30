#!/usr/bin/python3
"""Converts a SentencePiece model (.model, a serialized ModelProto) to the
tokenizer.bin format of tokenizer.bin-spec, read by tokenizer.h.

    /usr/bin/python3 dev/export_tokenizer.py IN.model OUT.bin [--extra-ids S]

--extra-ids S appends S sentinel pieces after the model's own V_tok pieces, as
OpenMoE's seqio (SentencePieceVocabulary with extra_ids) adds them to the
model it encodes and decodes with: user-defined pieces "\u2581<extra_id_k>" of
score 0, k = S-1 down to 0, so that <extra_id_k> is id V_tok + S - 1 - k
(SPEC §10). Header word [16] records S.

The protobuf is parsed by hand (Debian's python3-sentencepiece ships
sentencepiece_model_pb2.py, but that needs python3-protobuf, which is not a
dependency): only the fields tokenizer.h needs are read, every other field is
skipped. The checks SentencePiece makes when it loads a model
(model_interface.cc InitializePieces) are made here too, so that a model
spm_encode refuses is refused here, with a message. Files that people save
as a .model by mistake (a Git LFS pointer, Llama 3's tiktoken file, a
tokenizer.json) are named for what they are.

The safe file helpers here (open_regular, atomic_output) serve
dev/import_openmoe.py as well.
"""
import contextlib
import os
import re
import stat
import struct
import sys
import tempfile

TOKENIZER_MAGIC = 240201738
TOKENIZER_VERSION = 1
HEADER_INTS = 256

UNIGRAM, BPE = 1, 2
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# flag bits of header[8] (and, for the denormalizer, header[12])
F_ADD_DUMMY_PREFIX = 1
F_REMOVE_EXTRA_WHITESPACES = 2
F_ESCAPE_WHITESPACES = 4
F_BYTE_FALLBACK = 8
F_TREAT_WHITESPACE_AS_SUFFIX = 16


# the largest .model read (umT5's, 256000 pieces, is 4.3 MB)
MAX_MODEL_BYTES = 1 << 28
LFS_SIGNATURE = b"version https://git-lfs.github.com/spec/"
TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} [0-9]+\r?\n")  # "IQ== 0": a token's base64 bytes, its rank


class ProtoError(Exception):
    pass


class Refused(Exception):
    """a file that cannot be used: the message names it and says what is wrong"""


# ----------------------------------------------------------------------------
# files: read only when regular, written through a fresh temporary

def open_regular(path, shown=None, what="file"):
    """(binary file, size) of PATH for reading. A FIFO (which would block),
    a device or a directory is refused, and so is a Git LFS pointer."""
    shown = shown or path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)  # O_NONBLOCK: opening a FIFO returns
    except OSError as e:
        raise Refused("%s: cannot open (%s)" % (shown, e.strerror))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise Refused("%s: not a regular file" % shown)
    f = os.fdopen(fd, "rb")
    if f.read(len(LFS_SIGNATURE)) == LFS_SIGNATURE:
        f.close()
        raise Refused("%s: is a Git LFS pointer, not the %s: fetch it with git lfs pull" % (shown, what))
    f.seek(0)
    return f, st.st_size


@contextlib.contextmanager
def atomic_output(path):
    """a binary file for PATH's new content: a new temporary file beside PATH
    (mkstemp opens with O_CREAT|O_EXCL|O_NOFOLLOW, so never a planted file or
    link), synced and renamed over PATH when the block ends, removed when it
    raises. Raises OSError when the temporary cannot be made or written."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".",
                               suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # what open() would give, not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def varint(buf, pos):
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ProtoError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtoError("varint too long")


def fields(buf):
    """Yields (field number, wire type, value) of one serialized message;
    value is an int (varint, fixed32 and fixed64 as raw ints) or bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = varint(buf, pos)
        elif wt == 1:
            if pos + 8 > len(buf):
                raise ProtoError("truncated fixed64")
            val = struct.unpack_from("<Q", buf, pos)[0]
            pos += 8
        elif wt == 2:
            n, pos = varint(buf, pos)
            if pos + n > len(buf):
                raise ProtoError("truncated length-delimited field %d" % num)
            val = bytes(buf[pos:pos + n])
            pos += n
        elif wt == 5:
            if pos + 4 > len(buf):
                raise ProtoError("truncated fixed32")
            val = struct.unpack_from("<I", buf, pos)[0]
            pos += 4
        else:
            raise ProtoError("unsupported wire type %d (field %d)" % (wt, num))
        yield num, wt, val


def as_int32(v):
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_piece(buf):
    p = {"piece": b"", "score": 0, "type": NORMAL}  # score as float32 bits
    for num, wt, val in fields(buf):
        if num == 1 and wt == 2:
            p["piece"] = val
        elif num == 2 and wt == 5:
            p["score"] = val
        elif num == 3 and wt == 0:
            p["type"] = as_int32(val)
    return p


def parse_trainer_spec(buf):
    t = {"model_type": UNIGRAM, "byte_fallback": False, "treat_whitespace_as_suffix": False,
         "unk_surface": " \xe2\x81\x87 ".encode("latin-1"),
         "unk_piece": b"<unk>", "bos_piece": b"<s>", "eos_piece": b"</s>", "pad_piece": b"<pad>"}
    strings = {44: "unk_surface", 45: "unk_piece", 46: "bos_piece", 47: "eos_piece", 48: "pad_piece"}
    for num, wt, val in fields(buf):
        if num == 3 and wt == 0:
            t["model_type"] = as_int32(val)
        elif num == 35 and wt == 0:
            t["byte_fallback"] = val != 0
        elif num == 24 and wt == 0:
            t["treat_whitespace_as_suffix"] = val != 0
        elif num in strings and wt == 2:
            t[strings[num]] = val
    # model_interface.cc: an empty piece name means the default
    for k, d in (("unk_piece", b"<unk>"), ("bos_piece", b"<s>"), ("eos_piece", b"</s>"),
                 ("pad_piece", b"<pad>")):
        if not t[k]:
            t[k] = d
    return t


def parse_normalizer_spec(buf):
    n = {"name": b"", "charsmap": b"", "add_dummy_prefix": True,
         "remove_extra_whitespaces": True, "escape_whitespaces": True}
    for num, wt, val in fields(buf):
        if num == 1 and wt == 2:
            n["name"] = val
        elif num == 2 and wt == 2:
            n["charsmap"] = val
        elif num == 3 and wt == 0:
            n["add_dummy_prefix"] = val != 0
        elif num == 4 and wt == 0:
            n["remove_extra_whitespaces"] = val != 0
        elif num == 5 and wt == 0:
            n["escape_whitespaces"] = val != 0
    return n


def parse_model(buf):
    pieces, trainer, normalizer, denormalizer = [], b"", b"", None
    for num, wt, val in fields(buf):
        if num == 1 and wt == 2:
            pieces.append(parse_piece(val))
        elif num == 2 and wt == 2:
            trainer += val          # protobuf merges repeated occurrences
        elif num == 3 and wt == 2:
            normalizer += val
        elif num == 5 and wt == 2:
            denormalizer = (denormalizer or b"") + val
    return (pieces, parse_trainer_spec(trainer), parse_normalizer_spec(normalizer),
            parse_normalizer_spec(denormalizer) if denormalizer is not None else None)


def check_charsmap(blob, what):
    # normalizer.cc DecodePrecompiledCharsMap: <uint32 trie size><trie><strings>
    if len(blob) <= 4:
        raise ProtoError("%s: precompiled charsmap of %d bytes is broken" % (what, len(blob)))
    trie_size = struct.unpack_from("<I", blob, 0)[0]
    if trie_size >= len(blob) or trie_size + 4 > len(blob) or trie_size % 4 != 0:
        raise ProtoError("%s: charsmap trie size %d does not fit in the %d byte blob"
                         % (what, trie_size, len(blob)))


def flags_of(norm):
    f = 0
    if norm["add_dummy_prefix"]:
        f |= F_ADD_DUMMY_PREFIX
    if norm["remove_extra_whitespaces"]:
        f |= F_REMOVE_EXTRA_WHITESPACES
    if norm["escape_whitespaces"]:
        f |= F_ESCAPE_WHITESPACES
    return f


def read_model(path, shown=None):
    f, size = open_regular(path, shown, "model")
    with f:
        if size > MAX_MODEL_BYTES:
            raise Refused("%s: %d bytes, more than any SentencePiece model (%d)"
                          % (shown or path, size, MAX_MODEL_BYTES))
        return f.read(size)


def what_else(buf):
    """what a file that is not a SentencePiece model is, when it is one of
    those saved as one by mistake (a model starts with byte 0x0a, its first
    piece)"""
    if not buf:
        return "is empty"
    if TIKTOKEN_LINE.match(buf):
        return "is a tiktoken BPE file (Llama 3 style), not a SentencePiece model"
    if buf[:1] == b"{":
        return "is JSON (a Hugging Face tokenizer.json?), not a SentencePiece model"
    return None


def sentinel_pieces(n):
    """seqio's extra ids: <extra_id_k> for k = n-1 .. 0, user defined, score 0."""
    return [{"piece": ("\u2581<extra_id_%d>" % k).encode(), "score": 0, "type": USER_DEFINED}
            for k in reversed(range(n))]


def tokenizer_bytes(buf, model_path, extra_ids=0):
    """(the tokenizer.bin file, its number of pieces, a summary) of the
    serialized model BUF, read from MODEL_PATH, with EXTRA_IDS sentinels appended"""
    def bad(msg):
        raise Refused("%s: %s" % (model_path, msg))

    if what_else(buf):
        bad(what_else(buf))
    try:
        pieces, trainer, norm, denorm = parse_model(buf)
    except ProtoError as e:
        bad("not a SentencePiece model: %s" % e)

    if not pieces:
        bad("no pieces (not a SentencePiece model?)")
    pieces += sentinel_pieces(extra_ids)  # checked below like the model's own pieces
    if trainer["model_type"] not in (UNIGRAM, BPE):
        bad("model_type %d is not supported (only 1 = unigram and 2 = BPE)" % trainer["model_type"])

    # the checks of model_interface.cc InitializePieces
    seen, unk_id, byte_found = {}, -1, set()
    for i, p in enumerate(pieces):
        s, t = p["piece"], p["type"]
        if not s:
            bad("piece %d is empty" % i)
        if t not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
            bad("piece %d has unknown type %d" % (i, t))
        if s in seen:
            # SentencePiece refuses duplicates within a class; a string both
            # in the normal and the reserved class is refused here as well.
            bad("piece %d %r is already defined as piece %d" % (i, s, seen[s]))
        seen[s] = i
        if len(s) > 65535:
            bad("piece %d is longer than 65535 bytes" % i)
        if t == UNKNOWN:
            if unk_id >= 0:
                bad("unk is already defined (pieces %d and %d)" % (unk_id, i))
            unk_id = i
        if t == BYTE:
            if not trainer["byte_fallback"]:
                bad("byte piece %r is found although byte_fallback is false" % s)
            ok = len(s) == 6 and s[:3] == b"<0x" and s[5:] == b">"
            try:
                ok = ok and ("<0x%02X>" % int(s[3:5], 16)).encode() == s
            except ValueError:
                ok = False
            if not ok:
                bad("byte piece %r is invalid" % s)
            byte_found.add(s)
    if unk_id < 0:
        bad("unk is not defined")
    if trainer["byte_fallback"] and len(byte_found) != 256:
        bad("there are not 256 byte pieces although byte_fallback is true")

    def control_id(name):  # sentencepiece_processor.cc bos_id() etc.
        i = seen.get(trainer[name], -1)
        return i if i >= 0 and pieces[i]["type"] == CONTROL else -1

    bos_id, eos_id, pad_id = control_id("bos_piece"), control_id("eos_piece"), control_id("pad_piece")

    flags = flags_of(norm)
    if trainer["byte_fallback"]:
        flags |= F_BYTE_FALLBACK
    if trainer["treat_whitespace_as_suffix"]:
        flags |= F_TREAT_WHITESPACE_AS_SUFFIX
    charsmap = norm["charsmap"]
    try:
        if charsmap:
            check_charsmap(charsmap, "normalizer")
        if denorm is not None and denorm["charsmap"]:
            check_charsmap(denorm["charsmap"], "denormalizer")
    except ProtoError as e:
        bad(str(e))
    # spm uses a denormalizer only when it has a charsmap
    denorm_flags, denorm_charsmap = 0, b""
    if denorm is not None and denorm["charsmap"]:
        denorm_flags, denorm_charsmap = flags_of(denorm), denorm["charsmap"]

    table = bytearray()
    for p in pieces:
        table += struct.pack("<IBH", p["score"], p["type"], len(p["piece"]))
        table += p["piece"]

    name = norm["name"]
    unk_surface = trainer["unk_surface"]
    h = [0] * HEADER_INTS
    h[0] = TOKENIZER_MAGIC
    h[1] = TOKENIZER_VERSION
    h[2] = len(pieces)
    h[3] = trainer["model_type"]
    h[4], h[5], h[6], h[7] = unk_id, bos_id, eos_id, pad_id
    h[8] = flags
    h[9] = len(name)
    h[10] = len(unk_surface)
    h[11] = len(table)
    h[12] = len(charsmap)
    h[13] = denorm_flags
    h[14] = len(denorm_charsmap)
    h[15] = max(len(p["piece"]) for p in pieces)
    h[16] = extra_ids

    data = b"".join([struct.pack("<%di" % HEADER_INTS, *h), name, unk_surface, table, charsmap, denorm_charsmap])
    kinds = {UNIGRAM: "unigram", BPE: "bpe"}
    summary = "%d pieces (%d sentinels), %s, normalizer %s (charsmap %d bytes), unk %d bos %d eos %d pad %d, " \
        "flags 0x%x" % (len(pieces), extra_ids, kinds[trainer["model_type"]], name.decode("utf-8", "replace") or "-", len(charsmap),
        unk_id, bos_id, eos_id, pad_id, flags)
    return data, len(pieces), summary


def export(model_path, out_path, extra_ids=0):
    data, _, summary = tokenizer_bytes(read_model(model_path), model_path, extra_ids)
    try:
        with atomic_output(out_path) as f:
            f.write(data)
    except OSError as e:
        raise Refused("%s: cannot write (%s)" % (out_path, e.strerror or e))
    print("%s: %s" % (out_path, summary))


def main():
    args = sys.argv[1:]
    extra_ids = 0
    if len(args) == 4 and args[2] == "--extra-ids":
        try:
            extra_ids = int(args[3])
        except ValueError:
            extra_ids = -1
        if extra_ids < 0:
            sys.exit("error: --extra-ids %s: needs a whole number >= 0" % args[3])
        args = args[:2]
    if len(args) != 2:
        raise SystemExit("usage: %s IN.model OUT.bin [--extra-ids S]" % sys.argv[0])
    try:
        export(args[0], args[1], extra_ids)
    except Refused as e:
        sys.exit("error: %s" % e)


if __name__ == "__main__":
    main()
