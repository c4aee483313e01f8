"""The tftpy adapter: agrees with tftpy where tftpy is right, survives where tftpy breaks."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketACK, TftpPacketDAT, TftpPacketERR, TftpPacketOACK

from tftpd import packets
from tftpd.packets import Ack, Data, Error, MalformedPacket, OptionAck, Request

ascii_token = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=40
)
option_names = st.sampled_from(["blksize", "tsize", "timeout", "windowsize", "x-vendor"])


@given(block=st.integers(0, 0xFFFF), payload=st.binary(max_size=1500))
def test_data_encoding_is_tftpys(block: int, payload: bytes) -> None:
    ours = packets.encode_data(block, payload)
    theirs = TftpPacketDAT()
    theirs.blocknumber, theirs.data = block, payload
    assert ours == theirs.encode().buffer
    assert packets.data_header(block) + payload == ours
    assert packets.parse(ours) == Data(block, payload)


@given(block=st.integers(0, 0xFFFF))
def test_ack_encoding_is_tftpys(block: int) -> None:
    theirs = TftpPacketACK()
    theirs.blocknumber = block
    assert packets.encode_ack(block) == theirs.encode().buffer
    assert packets.parse(packets.encode_ack(block)) == Ack(block)
    assert packets.ack_block(packets.encode_ack(block)) == block


def test_block_numbers_wrap_on_the_wire() -> None:
    assert packets.encode_data(65536, b"x") == packets.encode_data(0, b"x")
    assert packets.encode_ack(65537) == packets.encode_ack(1)


@given(code=st.integers(0, 8), message=st.text(max_size=200))
def test_error_keeps_code_zero_and_custom_text(code: int, message: str) -> None:
    decoded = packets.parse(packets.encode_error(code, message))
    assert isinstance(decoded, Error)
    assert decoded.code == code
    # NUL cannot travel inside an ERROR string; everything else survives.
    assert decoded.message == message.replace("\0", " ")[: len(decoded.message)]
    assert len(decoded.message) == len(message.replace("\0", " ")) or len(message) > 150


def test_tftpy_gaps_that_the_adapter_fixes() -> None:
    """Each of these is a documented tftpy failure (docs/clients.md, "tftpy"); the adapter
    must not have it."""
    err0 = TftpPacketERR()
    err0.errorcode = 0
    with pytest.raises(KeyError):
        err0.encode()  # tftpy cannot encode code 0 ...
    assert packets.parse(packets.encode_error(0, "User aborted")) == Error(0, "User aborted")
    rrq_utf8 = b"\x00\x01k\xc3\xa9rnel\x00octet\x00"
    with pytest.raises(UnicodeDecodeError):
        TftpPacketFactory().parse(rrq_utf8)
    assert packets.parse(rrq_utf8) == Request(1, "kérnel", "octet", {})
    trailing = b"\x00\x01f\x00octet\x00blksize\x001468\x00junk"
    with pytest.raises(struct.error):
        TftpPacketFactory().parse(trailing)
    assert packets.parse(trailing) == Request(1, "f", "octet", {"blksize": "1468"})
    upper = b"\x00\x01f\x00OCTET\x00BlkSize\x001468\x00TSIZE\x000\x00"
    assert TftpPacketFactory().parse(upper).options == {"BlkSize": "1468", "TSIZE": "0"}
    assert packets.parse(upper) == Request(1, "f", "octet", {"blksize": "1468", "tsize": "0"})


@given(
    filename=ascii_token,
    options=st.dictionaries(option_names, st.integers(0, 99999).map(str), max_size=4),
)
def test_request_round_trip_matches_tftpy(filename: str, options: dict[str, str]) -> None:
    wire = packets.encode_request(packets.OP_RRQ, filename, "octet", options)
    ours = packets.parse(wire)
    theirs = TftpPacketFactory().parse(wire)
    assert ours == Request(packets.OP_RRQ, filename, "octet", options)
    assert (theirs.filename, theirs.mode, theirs.options) == (filename, "octet", options)


@given(options=st.dictionaries(option_names, st.integers(0, 99999).map(str), max_size=4))
def test_oack_is_encoded_by_tftpy_and_parsed_back(options: dict[str, str]) -> None:
    wire = packets.encode_oack(options)
    theirs = TftpPacketOACK()
    theirs.options = options
    assert wire == theirs.encode().buffer
    assert packets.parse(wire) == OptionAck(options)


@given(
    name=st.text(min_size=1, max_size=60).filter(lambda s: "\0" not in s),
    mode=st.sampled_from(["octet", "netascii", "OcTeT", "mail"]),
    opts=st.lists(st.tuples(st.text(max_size=12), st.text(max_size=12)), max_size=5),
)
def test_requests_with_any_text_round_trip(name: str, mode: str,
                                           opts: list[tuple[str, str]]) -> None:
    options = {}
    for k, v in opts:
        k, v = k.replace("\0", ""), v.replace("\0", "")
        if k and k.isascii() and v.isascii():
            options.setdefault(k.lower(), v)
    body = [name.encode("utf-8", "surrogatepass"), mode.encode()]
    for k, v in options.items():
        body += [k.encode(), v.encode()]
    wire = b"\x00\x01" + b"".join(p + b"\0" for p in body)
    parsed = packets.parse(wire)
    assert isinstance(parsed, Request)
    assert parsed.filename.encode("utf-8", "surrogateescape") == body[0]
    assert parsed.mode == mode.lower()
    assert parsed.options == options


@given(st.binary(max_size=600))
@example(b"")
@example(b"\x00")
@example(b"\x00\x01")
@example(b"\x00\x01file")
@example(b"\x00\x01\x00octet\x00")
@example(b"\x00\x01f\x00oct\xffet\x00")
@example(b"\x00\x04\x00")
@example(b"\x00\x05\x00")
@example(b"\x00\x09abc")
def test_any_datagram_parses_or_raises_malformed(data: bytes) -> None:
    """The single failure mode: MalformedPacket (never KeyError, struct.error, Unicode...)."""
    try:
        packet = packets.parse(data)
    except MalformedPacket as exc:
        assert str(exc)
        assert exc.code == packets.ERR_ILLEGAL_OPERATION
        return
    assert isinstance(packet, Request | Data | Ack | Error | OptionAck)


def test_malformed_requests() -> None:
    for bad in (b"\x00\x01", b"\x00\x01f", b"\x00\x01f\x00octet", b"\x00\x01\x00octet\x00",
                b"\x00\x07x", b"\x00\x04\x00"):
        with pytest.raises(MalformedPacket):
            packets.parse(bad)


def test_first_occurrence_of_a_repeated_option_wins() -> None:
    wire = b"\x00\x01f\x00octet\x00blksize\x00512\x00BLKSIZE\x001468\x00"
    assert packets.parse(wire).options == {"blksize": "512"}  # type: ignore[union-attr]


def test_an_option_value_cut_short_is_ignored() -> None:
    """A request truncated inside its last value (``1468`` arriving as ``146``) is not taken
    at its word: only values ended by their NUL count."""
    cut = b"\x00\x01f\x00octet\x00tsize\x000\x00blksize\x00146"
    assert packets.parse(cut).options == {"tsize": "0"}  # type: ignore[union-attr]
    assert packets.parse(cut + b"8\x00").options == {  # type: ignore[union-attr]
        "tsize": "0", "blksize": "1468"}


def test_error_without_terminator_and_short_error() -> None:
    assert packets.parse(b"\x00\x05\x00\x08Early terminate") == Error(8, "Early terminate")
    assert packets.parse(b"\x00\x05\x00\x00") == Error(0, "")


def test_non_octet_requests_are_encoded_for_clients() -> None:
    wire = packets.encode_request(packets.OP_RRQ, "é/f", "netascii", {"tsize": "0"})
    assert packets.parse(wire) == Request(1, "é/f", "netascii", {"tsize": "0"})
