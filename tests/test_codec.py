"""The wire codec and the request envelope refuse every malformed frame with the right code."""

import msgpack
import pytest

from syscalls import codec, limits
from syscalls.errors import ERRORS, Errno, SyscallError


def req(**over):
    base = {
        "v": limits.ABI_VERSION,
        "id": 7,
        "call": "proc.getpid",
        "pid": 2,
        "token": "t",
        "deadline_ms": None,
        "args": {},
    }
    base.update(over)
    return msgpack.packb(base)


def code_of(frame: bytes) -> Errno:
    with pytest.raises(SyscallError) as exc:
        codec.decode_request(frame)
    return exc.value.code


def test_valid_request_round_trips():
    frame = codec.encode_request(9, "llm.generate", {"prompt": "hi"}, 3, "tok", 1500)
    r = codec.decode_request(frame)
    assert (r.id, r.call, r.pid, r.token, r.deadline_ms, r.args) == (
        9,
        "llm.generate",
        3,
        "tok",
        1500,
        {"prompt": "hi"},
    )


@pytest.mark.parametrize(
    "frame", [b"", b"\xc1", b"\xff\xff\xff", b"\x92\x01", b"\xdb\x00\x00\x00\x10ab", b"hello world"]
)
def test_garbage_and_truncated_bytes_are_eproto(frame):
    assert code_of(frame) is Errno.EPROTO


def test_trailing_bytes_after_a_frame_are_eproto():
    assert code_of(req() + b"\x00") is Errno.EPROTO


def test_non_map_frame_is_eproto():
    assert code_of(msgpack.packb([1, 2, 3])) is Errno.EPROTO


def test_wrong_abi_version_is_eprotonosupport_and_names_both_versions():
    with pytest.raises(SyscallError) as exc:
        codec.decode_request(req(v=99))
    assert exc.value.code is Errno.EPROTONOSUPPORT
    assert "99" in exc.value.message and str(limits.ABI_VERSION) in exc.value.message


def test_missing_version_is_eprotonosupport():
    frame = msgpack.packb({"id": 1, "call": "proc.getpid"})
    assert code_of(frame) is Errno.EPROTONOSUPPORT


@pytest.mark.parametrize(
    "over",
    [
        {"id": -1},
        {"id": "7"},
        {"id": 2**64 - 1},
        {"id": True},
        {"call": ""},
        {"call": 5},
        {"call": "x" * 65},
        {"pid": -3},
        {"pid": "2"},
        {"token": 12},
        {"token": "t" * 500},
        {"deadline_ms": 0},
        {"deadline_ms": 1.5},
        {"deadline_ms": limits.MAX_DEADLINE_MS + 1},
        {"args": [1]},
        {"args": "x"},
        {"extra": 1},
    ],
)
def test_bad_envelope_fields_are_eproto(over):
    assert code_of(req(**over)) is Errno.EPROTO


def test_oversized_frame_is_e2big():
    assert code_of(b"\x00" * (limits.MAX_FRAME_BYTES + 1)) is Errno.E2BIG


def test_huge_declared_lengths_are_refused_without_allocating():
    # a map header claiming 2**32-1 entries, an array of 100k items
    assert code_of(b"\xdf\xff\xff\xff\xff") is Errno.EPROTO
    assert (
        code_of(msgpack.packb({"v": 1, "args": list(range(limits.MAX_ARRAY_ITEMS + 1))}))
        is Errno.EPROTO
    )


def test_deep_nesting_is_refused():
    frame = b"\x91" * 100_000 + b"\x00"
    assert code_of(frame) is Errno.EPROTO


def test_extension_types_and_non_string_keys_are_refused():
    assert code_of(msgpack.packb({"v": 1, "x": msgpack.ExtType(5, b"abc")})) is Errno.EPROTO
    assert code_of(msgpack.packb({1: 2})) is Errno.EPROTO


def test_salvage_id_finds_the_id_of_an_invalid_request():
    assert codec.salvage_id({"id": 12, "call": 5}) == 12
    assert codec.salvage_id({"id": "x"}) is None
    assert codec.salvage_id([1]) is None


def test_replies_and_chunks_encode_as_documented():
    assert msgpack.unpackb(codec.ok_reply(3, {"a": 1})) == {"id": 3, "ok": True, "result": {"a": 1}}
    err = SyscallError(Errno.ESRCH, "gone")
    assert msgpack.unpackb(codec.error_reply(3, err, seq=2)) == {
        "id": 3,
        "ok": False,
        "error": {"code": "ESRCH", "message": "gone"},
        "seq": 2,
    }
    assert msgpack.unpackb(codec.chunk_frame(3, 0, {"text": "x"})) == {
        "id": 3,
        "seq": 0,
        "chunk": {"text": "x"},
    }


def test_errors_rebuild_as_typed_exceptions():
    exc = SyscallError.from_wire({"code": "ETIMEDOUT", "message": "late"})
    assert isinstance(exc, ERRORS[Errno.ETIMEDOUT]) and exc.message == "late"
    assert SyscallError.from_wire({"code": "EWHAT", "message": 1}).code is Errno.EPROTO


def test_every_code_has_a_sentence():
    assert all(code.sentence for code in Errno)


def test_a_request_nested_deeper_than_the_limit_is_einval_not_a_crash():
    from syscalls import limits

    deep: object = {}
    for _ in range(990):
        deep = {"x": deep}
    frame = codec.packb(
        {
            "v": limits.ABI_VERSION,
            "id": 1,
            "call": "tool.call",
            "pid": 1,
            "token": "t",
            "args": {"name": "calculator", "args": deep},
        }
    )
    with pytest.raises(SyscallError) as err:
        codec.decode_request(frame)
    assert err.value.code == "EINVAL" and "deeper than" in err.value.message
    ok: object = [1]
    for _ in range(limits.MAX_FRAME_DEPTH - 3):
        ok = [ok]
    frame = codec.packb(
        {
            "v": limits.ABI_VERSION,
            "id": 2,
            "call": "ipc.send",
            "pid": 1,
            "token": "t",
            "args": {"message": ok},
        }
    )
    assert codec.decode_request(frame).id == 2
