"""Framing of the wire protocol: fast unit tests, no processes."""

import os

import pytest

from osproject import protocol


def test_frames_round_trip_any_file_name():
    raw = b"/srv/caf\xe9/line\nbreak\\back\rcr \x00-dash"
    path = os.fsdecode(raw)
    frame = protocol.encode({"path": path})
    assert frame.endswith(b"\n") and frame.count(b"\n") == 1
    assert frame.isascii()
    back = protocol.decode(frame[:-1])
    assert os.fsencode(back["path"]) == raw


def test_decode_rejects_what_is_not_an_object():
    for bad in (b"[1]", b"garbage", b"\xff\xfe", b'"str"'):
        with pytest.raises(protocol.ProtocolError):
            protocol.decode(bad)


def test_line_buffer_reassembles_split_frames():
    buf = protocol.LineBuffer()
    assert buf.feed(b'{"a":') == []
    assert buf.pending
    assert buf.feed(b'1}\n{"b":2}\n{"c"') == [b'{"a":1}', b'{"b":2}']
    assert buf.feed(b":3}\n") == [b'{"c":3}']
    assert not buf.pending


def test_line_buffer_bounds_a_line_without_newline():
    buf = protocol.LineBuffer(limit=100)
    out = []
    for _ in range(1000):                 # 100 KB without a newline
        out += buf.feed(b"x" * 100)
    assert out == [None]                  # reported once, not stored
    assert len(buf._buf) <= 100
    assert buf.feed(b"tail\nnext\n") == [b"next"]


def test_hello_fits_pipe_buf_or_is_refused():
    hello = protocol.encode_hello("/tmp/osp-x/request", "/tmp/osp-x/reply")
    assert len(hello) <= protocol.HELLO_MAX <= protocol.PIPE_BUF
    assert protocol.parse_hello(hello[:-1]) == ("/tmp/osp-x/request", "/tmp/osp-x/reply")
    with pytest.raises(protocol.ProtocolError):
        protocol.encode_hello("/" + "a" * 600, "/b")


@pytest.mark.parametrize("line", [
    b'{"hello":2,"request":"/a","reply":"/b"}',
    b'{"hello":1,"request":"relative","reply":"/b"}',
    b'{"hello":1,"request":"/a"}',
    b'{"hello":1,"request":"/a","reply":7}',
])
def test_bogus_hellos_are_refused(line):
    with pytest.raises(protocol.ProtocolError):
        protocol.parse_hello(line)


def test_a_hello_after_a_torn_line_is_read_whole():
    hello = protocol.encode_hello("/r/osp-client-x/request", "/r/osp-client-x/reply")
    assert hello.startswith(b"\n"), "its own newline ends whatever came before"
    buf = protocol.LineBuffer(limit=protocol.HELLO_MAX)
    assert buf.feed(b"torn" + hello) == [b"torn", hello.strip()]
    assert buf.feed(b"x" * 2000) == [None]
    assert buf.feed(hello) == [hello.strip()]


def test_the_longest_hello_of_an_entrance_directory_is_known_before_any_client():
    assert len(protocol.longest_hello("/run/osproject")) <= protocol.HELLO_MAX
    with pytest.raises(protocol.ProtocolError):
        protocol.longest_hello("/" + "d" * 250)
