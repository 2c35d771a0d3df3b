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


# -- every frame is built here and checked here --------------------------------------

MD5 = "0123456789abcdef" * 2


def test_a_request_built_by_the_client_is_one_the_server_accepts():
    item = protocol.check_item("/t/f", "/t/f.md5", (1, 2), MD5, 10, update=True)
    frame = protocol.decode(protocol.encode(protocol.request(7, [item] * 50)))
    assert protocol.validate_request(frame)["files"][0] == {
        "kind": "check", "path": "/t/f", "sidecar": "/t/f.md5", "dir": [1, 2],
        "expected": MD5, "size": 10, "update": True}
    for frame in (protocol.STATUS_REQUEST, protocol.roots(["/a", "/b"], 2),
                  protocol.audit([{"event": "file.moved", "path": "/a", "to": "/b",
                                   "check": 3, "md5": None}])):
        assert protocol.validate_request(protocol.decode(protocol.encode(frame))) == frame
    assert "md5" not in protocol.audit([{"event": "file.moved", "md5": None}])["audit"][0]


@pytest.mark.parametrize("frame, why", [
    ({"id": 1, "files": []}, "1 to 50 files"),
    ({"id": 1, "files": [{"kind": "check", "path": "/f", "sidecar": None}] * 51}, "1 to 50"),
    ({"id": "1", "files": [{"kind": "check", "path": "/f", "sidecar": None}]}, "an id"),
    ({"id": 1, "files": [{"kind": "read", "path": "/f"}]}, 'kind "check"'),
    ({"id": 1, "files": [{"kind": "missing", "path": "/f", "sidecar": "/f.md5"}]},
     'kind "check"'),
    ({"id": True, "files": [{"kind": "check", "path": "/f", "sidecar": None}]}, "an id"),
    ({"id": 1, "status": True, "files": [{"kind": "check", "path": "/f", "sidecar": None}]},
     "nothing else"),
    ({"id": 1, "files": [{"kind": "check", "path": "/f", "sidecar": None, "md5": MD5}]},
     "has only"),
    ({"id": 1, "files": [{"kind": "check", "path": "/f", "sidecar": None, "size": True}]},
     "size"),
    ({"id": 1, "files": [{"kind": "check", "path": "/f", "sidecar": None, "update": 1}]},
     "update must be"),
    ({"roots": ["/a"], "count": 1, "id": 1, "files": []}, "nothing else"),
    ({"id": 1, "files": [{"kind": "check", "path": "f", "sidecar": None}]}, "absolute path"),
    ({"id": 1, "files": [{"kind": "check", "path": "/f", "sidecar": "f.md5"}]}, "sidecar"),
    ({"id": 1, "files": [{"kind": "check", "path": "/f"}]}, "sidecar"),
    ({"id": 1, "files": [{"kind": "check", "path": "/f", "sidecar": None, "size": "9"}]},
     "size"),
    ({"id": 1, "files": [{"kind": "check", "path": "/f", "sidecar": None, "dir": [1]}]},
     "dir must be"),
    ({"id": 1, "files": [{"kind": "check", "path": "/f", "sidecar": None,
                          "expected": MD5.upper()}]}, "32 lowercase hex"),
    ({"roots": ["/a", "rel"], "count": 2}, "absolute paths"),
    ({"roots": ["/a"], "count": 0}, "their count"),
    ({"audit": []}, "1 to 100 events"),
    ({"audit": [{"event": "worker.warned"}]}, "one of file.changed"),
    ({"audit": [{"event": "file.changed", "session": 9}]}, "lowercase names"),
    ({"audit": [{"event": "file.changed", "Path": "/a"}]}, "lowercase names"),
    ({"audit": [{"event": "file.changed", "ok": True}]}, "string or number"),
])
def test_the_server_refuses_a_request_that_breaks_a_rule_and_says_which(frame, why):
    with pytest.raises(protocol.ProtocolError, match=why):
        protocol.validate_request(frame)


def test_a_verdict_leaves_out_what_it_does_not_know():
    assert protocol.verdict(3, 4, "OK", MD5, MD5) == {"id": 3, "i": 4, "status": "OK",
                                                      "md5": MD5, "expected": MD5}
    assert protocol.verdict(3, 0, "NEW", MD5, unchecked=True) == {
        "id": 3, "i": 0, "status": "NEW", "md5": MD5, "unchecked": True}
    assert protocol.read_welcome(protocol.welcome(12, 999)) == 12
    with pytest.raises(protocol.ProtocolError):
        protocol.read_welcome(protocol.bye({}))


def test_a_worker_answer_must_match_its_assignment_path_for_path():
    item = protocol.assignment_item("/t/f", "/t/f.md5", (1, 2), "new", stale=(41,))
    assert "expected" not in item and item["stale"] == [41]
    assert "stale" not in protocol.assignment_item("/t/f", None, None, "keep")
    good = {"path": "/t/f", "md5": MD5, "size": 1, "mtime": 2, "ctime": 3, "ino": 4}
    [result] = protocol.check_results(protocol.results(5, [dict(good)]), 5, ["/t/f"])
    assert result["stat"] == (1, 2, 3, 4)
    assert protocol.is_ready({"ready": 41}, 41) and protocol.is_progress({"progress": 5}, 5)
    assert not protocol.is_ready({"ready": 41.0}, 41) and not protocol.is_progress({}, 5)
    assert not protocol.is_progress({"progress": True}, 1)
    for frame, why in ((protocol.results(6, [good]), "does not match"),
                       ({"id": 5.0, "results": [good]}, "does not match"),
                       (protocol.results(5, [good, good]), "does not match"),
                       (protocol.results(5, [{**good, "path": "/etc/passwd"}]), "not given"),
                       (protocol.results(5, [{**good, "md5": "x" * 32}]), "malformed md5"),
                       (protocol.results(5, [{**good, "ino": "4"}]), "malformed stat"),
                       (protocol.results(5, [{**good, "error": {"x": 1}}]), "malformed error"),
                       (protocol.results(5, [{**good, "error": "e" * 1001}]),
                        "malformed error"),
                       (protocol.results(5, [{"path": "/t/f", "skipped": 7}]),
                        "malformed skipped"),
                       (protocol.results(5, [{**good, "wrote": "yes"}]), "malformed wrote"),
                       (protocol.results(5, [{**good, "size": 1.5}]),
                        "malformed stat")):
        with pytest.raises(protocol.ProtocolError, match=why):
            protocol.check_results(frame, 5, ["/t/f"])
