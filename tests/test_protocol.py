"""Framing of the wire protocol: fast unit tests, no processes."""

import os
import struct

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
    b'{"hello":1,"request":"/a","reply":"/b"}',         # another release's
    b'{"hello":"2","request":"/a","reply":"/b"}',
    b'{"hello":2,"request":"relative","reply":"/b"}',
    b'{"hello":2,"request":"/a"}',
    b'{"hello":2,"request":"/a","reply":7}',
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
    request = protocol.validate_request(frame)
    assert request.rid == 7 and len(request.items) == 50
    assert request.items[0] == protocol.CheckItem(path="/t/f", sidecar="/t/f.md5", dir=(1, 2),
                                                  expected=MD5, size=10, update=True)
    for frame in (protocol.STATUS_REQUEST, protocol.roots(["/a", "/b"], 2),
                  protocol.audit([{"event": "file.moved", "path": "/a", "to": "/b",
                                   "check": 3, "md5": None}])):
        assert protocol.validate_request(protocol.decode(protocol.encode(frame))) == frame
    assert "md5" not in protocol.audit([{"event": "file.moved", "md5": None}])["audit"][0]


def test_a_request_names_each_directory_once_and_reads_back_file_by_file():
    C = protocol.CheckItem
    items = [C("/t/a", "/t/a.md5", (1, 2), MD5, 3), C("/t/b.md5", "/t/b.md5.md5", (1, 2)),
             C("/t/b", None, (1, 2), None, 5),           # its sidecar's name is a file
             C("/t/u/c", "/t/u/c.md5", (1, 3)),          # another directory
             C("/t/a2", "/t/a2.md5", (1, 2)),            # back: a group of its own
             C("/r", "/r.md5", (1, 1)),                  # in the root directory
             C("/t/s", "/store/t/s.md5", (1, 2)),        # a --store mirror
             C("/t/ü\udcff", "/t/ü\udcff.md5", (1, 2)),  # no UTF-8: a surrogate escape
             C("/t/x", "/t/x.md5", None)]                # no identity: nothing read
    frame = protocol.request(4, items)
    assert frame == {"id": 4, "dirs": [
        ["/t", 1, 2, None, [["a", MD5, 3], ["b.md5", None, 0], ["b", None, 5, False]]],
        ["/t/u", 1, 3, None, [["c", None, 0]]],
        ["/t", 1, 2, None, [["a2", None, 0]]],
        ["/", 1, 1, None, [["r", None, 0]]],
        ["/t", 1, 2, "/store/t", [["s", None, 0]]],
        ["/t", 1, 2, None, [["ü\udcff", None, 0]]],
        ["/t", None, None, None, [["x", None, 0]]]]}
    assert protocol.validate_request(protocol.decode(protocol.encode(frame))) == \
        protocol.Request(4, items)
    updating = protocol.request(5, [C("/t/a", "/t/a.md5", (1, 2), update=True)])
    assert updating["update"] is True
    assert protocol.validate_request(updating).items[0].update
    with pytest.raises(ValueError):         # a sidecar not named after its file
        protocol.request(6, [C("/t/a", "/t/other.md5", (1, 2))])
    with pytest.raises(ValueError):         # one update for all the files
        protocol.request(6, [C("/t/a", None, (1, 2), update=True), C("/t/b", None, (1, 2))])


@pytest.mark.parametrize("path", ["//x", "///x", "//a/x", "/a//x", "/a/b//x", "/x"])
def test_a_path_reads_back_as_it_was_however_many_slashes_it_has(path):
    """(From a review.)  "//x" went as directory "/" and name "x", and came
    back as "/x": a correction for it, keyed by its path, missed the file."""
    item = protocol.check_item(path, path + ".md5", (1, 2))
    frame = protocol.decode(protocol.encode(protocol.request(1, [item])))
    assert protocol.validate_request(frame).items == [item]


def test_a_request_names_no_directory_or_name_longer_than_the_os_takes():
    """(From a review.)  A directory is named once for 50 files: without a
    bound, 300 KB of request became 30 MB of paths in the server and
    assignments no worker would take."""
    deep = "/" + "d" * (protocol.PATH_MAX - 1)
    mirror = "/s" * (protocol.SIDECARS_MAX // 2 - 2) + "/t"      # a --store mirror, deeper
    nameable, name = protocol.nameable, "n" * protocol.NAME_MAX
    assert nameable(deep + "/" + name, None) and nameable(deep + "/f", mirror + "/f.md5")
    assert not nameable(deep + "d/f", None) and not nameable("/t/" + name + "n", None)
    assert not nameable("/t/f", mirror + "/sss/f.md5"), "the mirror's directory counts"
    assert not nameable("/t/" + "é" * 513, None), "bytes count, not characters"
    for path, sidecar in ((deep + "/" + name, deep + "/" + name + ".md5"),
                          (deep + "/f", mirror + "/f.md5"), ("/t/é", "/t/é.md5")):
        item = protocol.check_item(path, sidecar, (1, 2))
        assert protocol.validate_request(protocol.request(1, [item])).items == [item]
    for path, sidecar in (("/t/" + name + "n", None), ("/t/f", mirror + "/sss/f.md5")):
        with pytest.raises(protocol.ProtocolError):     # what nameable() says no to
            protocol.validate_request(protocol.request(1, [protocol.check_item(
                path, sidecar, (1, 2))]))


def _files(*files, directory="/t", dev=1, ino=2, sidecars=None):
    return {"id": 1, "dirs": [[directory, dev, ino, sidecars, list(files)]]}


@pytest.mark.parametrize("frame, why", [
    ({"id": 1, "dirs": []}, "an id and its files by directory"),
    ({"id": 1}, "an id and its files"),
    ({"dirs": _files(["f", None, 1])["dirs"]}, "an id"),
    ({"id": "1", "dirs": _files(["f", None, 1])["dirs"]}, "an id"),
    ({"id": True, "dirs": _files(["f", None, 1])["dirs"]}, "an id"),
    ({"id": 1, "status": True, "dirs": _files(["f", None, 1])["dirs"]}, "nothing else"),
    ({**_files(["f", None, 1]), "update": 1}, "update must be"),
    (_files(*[["f", None, 1]] * 51), "1 to 50 files"),
    ({"id": 1, "dirs": _files(*[["f", None, 1]] * 30)["dirs"] * 2}, "1 to 50 files"),
    ({"id": 1, "dirs": [["/t", 1, 2, None]]}, r"\[directory, st_dev"),
    ({"id": 1, "dirs": [{"dir": "/t"}]}, r"\[directory, st_dev"),
    (_files(["f", None, 1], directory="t"), "absolute path"),
    (_files(["f", None, 1], directory="/t\0"), "absolute path"),
    (_files(["f", None, 1], dev=None), "two integers"),
    (_files(["f", None, 1], dev=True), "two integers"),
    (_files(["f", None, 1], sidecars="store"), "absolute directory"),
    (_files(), "1 to 50 files"),
    (_files({"name": "f"}), r"\[name, expected, size\]"),
    (_files(["f", None]), r"\[name, expected, size\]"),
    (_files(["f", None, 1, False, 0]), r"\[name, expected, size\]"),
    (_files(["", None, 1]), "one entry of its directory"),
    (_files([".", None, 1]), "one entry of its directory"),
    (_files(["..", None, 1]), "one entry of its directory"),
    (_files(["a/b", None, 1]), "one entry of its directory"),
    (_files(["a\0b", None, 1]), "one entry of its directory"),
    (_files(["\ud800", None, 1]), "one entry of its directory"),   # no file's name
    (_files([7, None, 1]), "one entry of its directory"),
    (_files(["f", MD5.upper(), 1]), "32 lowercase hex"),
    (_files(["f", MD5, True]), "size"),
    (_files(["f", MD5, "9"]), "size"),
    (_files(["f", MD5, 1, None]), "fourth field"),
    (_files(["f", None, 1], directory="/" + "d" * 4096), "at most 4096 bytes"),
    (_files(["f", None, 1], directory="/" + "é" * 2048), "at most 4096 bytes"),
    (_files(["f", None, 1], sidecars="/" + "s" * 8192), "at most 8192 bytes"),
    (_files(["n" * 1025, None, 1]), "at most 1024 bytes"),
    (_files(["f", MD5, 1, True]), "fourth field"),
    ({"roots": ["/a"], "count": 1, "id": 1, "dirs": []}, "nothing else"),
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
    with pytest.raises(protocol.ProtocolError,
                       match=f"speaks protocol version 1, this client {protocol.HELLO_VERSION}"):
        protocol.read_welcome({"welcome": 1, "server": 9, "session": 1})


def test_a_hello_of_another_release_says_so_with_where_to_answer():
    with pytest.raises(protocol.VersionMismatch, match="restart the server") as caught:
        protocol.read_hello(b'{"hello":1,"request":"/a","reply":"/b","pid":7}')
    assert (caught.value.request, caught.value.reply) == ("/a", "/b")


def test_an_ok_frame_is_request_ids_and_indexes_only():
    assert protocol.read_oks(protocol.oks([[7, 0, 3], [9, 1]])) == [[7, 0, 3], [9, 1]]
    for bad in ({"ok": [[7]]}, {"ok": [[7, "1"]]}, {"ok": [7, 1]}, {"ok": {"7": [1]}},
                {"ok": [[7, 1.0]]}):
        with pytest.raises(protocol.ProtocolError):
            protocol.read_oks(bad)


def _frames(data, chunk):
    """The frames a FrameBuffer makes of `data` fed `chunk` bytes at a time."""
    buf, out = protocol.FrameBuffer(), []
    for i in range(0, len(data), chunk):
        out += buf.feed(data[i:i + chunk])
    assert not buf.pending
    return out


def test_an_assignment_carries_any_name_and_never_the_expected_hash():
    odd = os.fsdecode(b"/t/caf\xe9 \n\\x.txt")        # not UTF-8, a newline, a backslash
    tasks = [protocol.Task(odd, odd + ".md5", (1, 2), "new", (41, 42)),
             protocol.Task("/t/g", None, None, "keep")]
    data = protocol.assignment(7, tasks)
    assert b"expected" not in data and MD5.encode() not in data
    for chunk in (1, 3, len(data)):
        [fields] = _frames(data, chunk)
        assert protocol.read_assignment(fields) == (7, tasks)
    with pytest.raises(protocol.ProtocolError):
        protocol.read_assignment([b"results", b"7"])


def test_a_worker_frame_too_long_or_not_ended_is_refused():
    good = protocol.progress(3)
    assert _frames(good * 3, 5) == [[b"progress", b"3"]] * 3
    buf = protocol.FrameBuffer(limit=100)
    assert buf.feed(protocol.pack([b"x" * 200]) + good) == [None]
    assert buf.feed(good) == [], "a stream past saving stays so"
    unended = struct.pack(">I", 4) + b"abcd"
    buf = protocol.FrameBuffer()
    assert buf.feed(good + unended + good) == [[b"progress", b"3"], None]
    assert buf.feed(good) == [], "not a frame of ours: the stream is past saving too"
    assert protocol.FrameBuffer().feed(struct.pack(">I", 0)) == [None]


GOOD = {"md5": MD5, "size": 1, "mtime": -2, "ctime": 3, "ino": 4}


def test_a_worker_answer_is_read_result_for_task():
    answers = [dict(GOOD, racy=True, wrote=True), {"error": "Permission denied"},
               {"skipped": "socket"}, {"discarded": True},
               dict(GOOD, unstable="changed while it was read")]
    data = protocol.results(5, answers)
    [fields] = _frames(data, 7)
    ok, error, skipped, discarded, unstable = protocol.check_results(fields, 5, 5)
    assert ok == {"md5": MD5, "stat": (1, -2, 3, 4), "racy": True, "wrote": True,
                  "discarded": False}
    assert error == {"error": "Permission denied"} and skipped == {"skipped": "socket"}
    assert discarded == {"racy": False, "wrote": False, "discarded": True}
    assert unstable["unstable"] == "changed while it was read" and unstable["md5"] == MD5
    assert protocol.is_ready([b"ready", b"41"], 41) and protocol.is_progress([b"progress", b"5"], 5)
    assert not protocol.is_ready([b"ready", b"041"], 41)
    assert not protocol.is_progress([b"progress", b"5", b""], 5)


def _answer(*results, aid=b"5"):
    fields = [b"results", aid]
    for result in results:
        fields += result
    return fields


OK_FIELDS = [MD5.encode(), b"1", b"2", b"3", b"4", b"", b"", b"", b""]


@pytest.mark.parametrize("fields, why", [
    (_answer(OK_FIELDS, aid=b"6"), "does not match"),
    (_answer(OK_FIELDS, aid=b"5.0"), "does not match"),
    (_answer(OK_FIELDS, OK_FIELDS), "does not match"),
    (_answer(OK_FIELDS[:-1]), "does not match"),
    ([b"result", b"5"] + OK_FIELDS, "does not match"),
    (_answer([b"x" * 32] + OK_FIELDS[1:]), "malformed md5"),
    (_answer([MD5.upper().encode()] + OK_FIELDS[1:]), "malformed md5"),
    (_answer([MD5[:31].encode()] + OK_FIELDS[1:]), "malformed md5"),
    (_answer(OK_FIELDS[:1] + [b"1.5"] + OK_FIELDS[2:]), "malformed stat"),
    (_answer(OK_FIELDS[:1] + [b"0x1"] + OK_FIELDS[2:]), "malformed stat"),
    (_answer(OK_FIELDS[:4] + [b""] + OK_FIELDS[5:]), "malformed stat"),
    (_answer([b""] + OK_FIELDS[1:]), "malformed stat"),
    (_answer(OK_FIELDS[:5] + [b"rx"] + OK_FIELDS[6:]), "malformed flags"),
    (_answer(OK_FIELDS[:6] + [b"e" * 1001] + OK_FIELDS[7:]), "malformed error"),
    (_answer(OK_FIELDS[:7] + [b"s" * 1001, b""]), "malformed skipped"),
])
def test_a_worker_answer_that_is_not_one_of_ours_is_refused(fields, why):
    with pytest.raises(protocol.ProtocolError, match=why):
        protocol.check_results(fields, 5, 1)


def test_what_a_worker_says_reaches_the_log_bounded_and_without_nul():
    [result] = protocol.check_results(
        _frames(protocol.results(1, [{"error": "a\0b" + "e" * 2000}]), 100)[0], 1, 1)
    assert result["error"].startswith("a b") and len(result["error"]) == protocol.MAX_REASON


def test_a_workers_words_cannot_forge_a_report_line_or_drive_a_terminal():
    fields = _frames(protocol.results(1, [{"error": "x\nOK  /etc/shadow\x1b[2K\r"}]), 100)[0]
    [result] = protocol.check_results(fields, 1, 1)
    assert result["error"] == "x\\x0aOK  /etc/shadow\\x1b[2K\\x0d"
    assert result["error"].isprintable()


def test_a_workers_escaped_words_mean_one_thing_only():
    assert protocol._printable("a\\x0a") != protocol._printable("a\n")
    assert protocol._printable("a\\x0a") == "a\\\\x0a"
    assert protocol._printable("\U000e0041") == "\\U000e0041"
    assert protocol._printable("plain words, é") == "plain words, é"
