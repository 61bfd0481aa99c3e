"""Codec round trips over awkward arrays, and rejection of malformed frames (never unpickled)."""

import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol import ProtocolError
from protocol.codec import BFloat16, DTYPES, decode, encode


def roundtrip(body):
    return decode(encode("request", 5, "op", body)).body


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_roundtrip_every_whitelisted_dtype(dtype):
    a = (np.arange(24) % 7).astype(dtype).reshape(2, 3, 4)
    b = roundtrip({"a": a})["a"]
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)


@pytest.mark.parametrize("arr", [
    np.array(3.5, np.float32),                                  # 0-d
    np.zeros((0, 3), np.float32),                               # empty
    np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2],      # non-contiguous
    np.asfortranarray(np.arange(12, dtype=np.int32).reshape(3, 4)),  # Fortran order
    np.arange(6, dtype=">f4"),                                  # big-endian
], ids=["0d", "empty", "strided", "fortran", "bigendian"])
def test_roundtrip_awkward_layouts(arr):
    b = roundtrip({"x": arr})["x"]
    assert b.shape == arr.shape
    assert np.array_equal(b, arr)
    assert b.dtype.byteorder in ("<", "=", "|")


def test_bfloat16_travels_as_bits_and_widens_exactly():
    x = np.array([1.0, -2.5, 3.140625, 0.0, 65280.0], np.float32)  # all exactly representable in bf16
    bf = BFloat16.from_float32(x)
    back = roundtrip({"w": bf})["w"]
    assert isinstance(back, BFloat16) and back == bf
    assert np.array_equal(back.to_float32(), x)


def test_nested_structures_and_scalars():
    body = {"a": [np.ones(3), {"b": np.int64(4)}], "s": "text", "n": None, "t": (1, 2)}
    out = roundtrip(body)
    assert np.array_equal(out["a"][0], np.ones(3)) and out["a"][1]["b"] == 4 and out["t"] == [1, 2]


def test_large_tensor_is_chunked_and_reassembled(monkeypatch):
    from protocol import codec
    monkeypatch.setattr(codec, "CHUNK_BYTES", 1000)
    a = np.arange(3000, dtype=np.float32)
    frames = encode("reply", 1, "x", {"a": a})
    assert len(frames) == 1 + 12
    assert np.array_equal(decode(frames).body["a"], a)


def test_object_dtype_refused_on_encode():
    with pytest.raises(ProtocolError):
        encode("request", 1, "x", {"a": np.array([object()], dtype=object)})


def _header(table, body=None, kind="request"):
    return msgpack.packb({"a": table}) + msgpack.packb(
        {"v": 1, "kind": kind, "id": 1, "op": "x", "body": body})


@pytest.mark.parametrize("frames,match", [
    ([], "empty"),
    ([b"\xc1"], "msgpack"),
    ([_header([["object", [1], 1]]), b"x" * 8], "whitelist"),
    ([_header([["float32", [4], 1]]), b"x" * 15], "needs 16 bytes"),
    ([_header([["float32", [4], 2]]), b"x" * 16], "frames"),
    ([_header([]), b"extra"], "unannounced"),
    ([_header([["float32", [-1], 1]]), b""], "bad shape"),
    ([_header([], kind="bogus")], "kind"),
    ([msgpack.packb({"a": []}) + msgpack.packb({"v": 1, "kind": "request", "id": "one", "op": "x"})], "wrong type"),
    ([_header([], body=msgpack.ExtType(1, b"\x05\x00\x00\x00"))], "refers to array"),
    ([_header([], body=msgpack.ExtType(9, b"x"))], "extension"),
], ids=["empty", "garbage", "objdtype", "short", "missingframe", "extra", "negshape", "kind", "idtype",
        "dangling", "ext"])
def test_malformed_frames_raise_protocol_error(frames, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frames)


def test_pickle_payload_is_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Evil())
    for frames in ([payload], [_header([["O", [1], 1]]), payload], [_header([]) + payload]):
        with pytest.raises(ProtocolError):
            decode(frames)
    assert not marker.exists()


finite_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.int8, np.uint16, np.bool_, np.float16]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))


@settings(max_examples=200, deadline=None)
@given(arrays=st.lists(finite_arrays, max_size=4), rid=st.integers(-2**62, 2**62), op=st.text(max_size=20))
def test_property_roundtrip(arrays, rid, op):
    msg = decode(encode("reply", rid, op, {"xs": arrays}))
    assert msg.id == rid and msg.op == op
    assert len(msg.body["xs"]) == len(arrays)
    for a, b in zip(arrays, msg.body["xs"]):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=4))
def test_property_random_bytes_never_crash(frames):
    try:
        decode(frames)
    except ProtocolError:
        pass


def test_reply_carries_the_workers_handler_seconds_and_garbage_is_ignored():
    got = decode(encode("reply", 3, "forward", {"x": np.ones(3)}, seconds=1.25))
    assert got.seconds == 1.25 and got.body["x"].tolist() == [1.0, 1.0, 1.0]
    assert decode(encode("reply", 3, "forward", {})).seconds is None  # older workers: no timing
    for bad in ("1.0", True, -1.0, float("inf"), None, [1]):
        header = {"v": 1, "kind": "reply", "id": 3, "op": "x", "body": {}, "t": bad}
        frames = [msgpack.packb({"a": []}) + msgpack.packb(header)]
        assert decode(frames).seconds is None, bad
