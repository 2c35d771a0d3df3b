"""Every link in the documents leads to a file of the repository.

README.md, CHANGELOG.md and docs/*.md are read in a checkout, a tarball or
on a forge: a link to a URL, to an absolute path or out of the tree (`../`
past the root) would lead nowhere in at least one of them.  A relative link
must name a file or directory inside the repository, and its `#anchor`, if
any, a heading of that document.
"""

import glob
import os
import re

from helpers import ROOT

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.M | re.S)
_CODE = re.compile(r"(`+)(?!`).+?(?<!`)\1(?!`)", re.S)
_INLINE = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s.*)?$", re.M)
_AUTOLINK = re.compile(r"<([a-zA-Z][a-zA-Z0-9+.-]*:[^>\s]*)>")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_HEADING = re.compile(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", re.M)


def documents(root=ROOT):
    paths = [os.path.join(root, "README.md"), os.path.join(root, "CHANGELOG.md")]
    return paths + sorted(glob.glob(os.path.join(root, "docs", "*.md")))


def prose(text):
    """The text without fenced code blocks and code spans: no links live there."""
    text = _FENCE.sub("", text)
    return _CODE.sub(lambda m: "code", text)


def links(text):
    """Every link target of a markdown text: inline, reference and autolinks."""
    text = prose(text)
    return ([target for _, target in _INLINE.findall(text)]
            + _REFERENCE.findall(text) + _AUTOLINK.findall(text))


def slug(heading):
    """The anchor a forge (GitHub, GitLab, Gitea) makes of a heading."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)                 # code spans keep their text
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)     # links keep theirs
    text = text.strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path):
    with open(path, encoding="utf-8") as f:
        text = _FENCE.sub("", f.read())
    seen, result = {}, set()
    for heading in _HEADING.findall(text):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(path, root=ROOT):
    """Return a description of every link in the document at `path` that
    does not lead to a file of the repository at `root`."""
    root = os.path.realpath(root)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    problems = []
    where = os.path.relpath(path, root)
    for target in links(text):
        if not target:
            problems.append(f"{where}: an empty link")
            continue
        if _SCHEME.match(target) or target.startswith("//"):
            problems.append(f"{where}: {target} leaves the repository")
            continue
        if target.startswith("/"):
            problems.append(f"{where}: {target} is an absolute path, not in the repository")
            continue
        file_part, _, anchor = target.partition("#")
        resolved = os.path.realpath(os.path.join(os.path.dirname(path), file_part)) \
            if file_part else os.path.realpath(path)
        if resolved != root and not resolved.startswith(root + os.sep):
            problems.append(f"{where}: {target} leads out of the repository")
            continue
        if not os.path.exists(resolved):
            problems.append(f"{where}: {target}: no such file in the repository")
            continue
        if anchor:
            if not resolved.endswith(".md") or os.path.isdir(resolved):
                problems.append(f"{where}: {target}: an anchor into a file without headings")
            elif anchor not in anchors(resolved):
                problems.append(f"{where}: {target}: no heading #{anchor} in "
                                f"{os.path.relpath(resolved, root)}")
    return problems


def test_every_link_in_the_documents_leads_inside_the_repository():
    paths = documents()
    assert len(paths) >= 6, paths
    checked = sum(len(links(open(p, encoding="utf-8").read())) for p in paths)
    assert checked > 30, "the link pattern no longer finds the links"
    problems = [problem for path in paths for problem in broken_links(path)]
    assert problems == []


def test_the_readme_and_the_index_lead_to_every_document():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = set(links(f.read()))
    assert {"docs/README.md", "docs/design.md", "docs/protocol.md",
            "docs/development.md", "docs/catalog.md"} <= readme
    with open(os.path.join(ROOT, "docs", "README.md"), encoding="utf-8") as f:
        index = {target.partition("#")[0] for target in links(f.read())}
    every_doc = {os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "docs", "*.md"))}
    assert every_doc - {"README.md"} <= index, "docs/README.md misses a document"


def test_the_link_checker_finds_what_is_broken(tmp_path):
    """The tests above cannot pass for a checker blind to a broken link."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# Some `code` here\n\n## Twice\n\n## Twice\n")
    (tmp_path / "outside.md").write_text("x")
    doc = tmp_path / "docs" / "a.md"
    doc.write_text(
        "# A\n\n"
        "[fine](b.md) [fine](b.md#some-code-here) [fine](b.md#twice-1) [fine](#a)\n"
        "[fine](../docs/) [fine](<b.md> \"title\")\n"
        "[gone](missing.md) [anchor](b.md#nowhere) [self](#nowhere)\n"
        "[web](https://example.com/) [abs](/etc/passwd) [up](../../shared/design.md)\n"
        "[out](../outside.md)\n"
        "![image](pic.png)\n"
        "[split\nover lines](also-missing.md)\n\n"
        "[ref]: gone-too.md\n\n"
        "`[in code](not-a-link.md)`\n\n"
        "```\n[in a block](not-a-link-either.md)\n```\n")
    problems = broken_links(str(doc), root=str(tmp_path / "docs"))
    found = [p.split(": ", 1)[1] for p in problems]
    assert found == [
        "missing.md: no such file in the repository",
        "b.md#nowhere: no heading #nowhere in b.md",
        "#nowhere: no heading #nowhere in a.md",
        "https://example.com/ leaves the repository",
        "/etc/passwd is an absolute path, not in the repository",
        "../../shared/design.md leads out of the repository",
        "../outside.md leads out of the repository",
        "pic.png: no such file in the repository",
        "also-missing.md: no such file in the repository",
        "gone-too.md: no such file in the repository",
    ], problems


def test_no_link_climbs_a_directory():
    """A link with `..` is one a reader's tools check only knowing where the
    file sits, and one that a copy of docs/ alone breaks: name the file
    instead, as `README.md`, at the top of the repository."""
    climbing = [f"{os.path.relpath(path, ROOT)}: {target}" for path in documents()
                for target in links(open(path, encoding="utf-8").read())
                if ".." in target.split("#")[0].split("/")]
    assert climbing == []
