"""lm1b preparation: download (resume, restart, checksum), archive extraction, split choice,
vocabulary cut-offs, binarization round trip, bad input, idempotence.

Every archive is built here and served from 127.0.0.1; nothing is downloaded."""

import hashlib
import io
import os
import re
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_prep import lm1b
from data_prep.binarize import SPLITS, file_sha256, read_meta, read_split
from data_prep.download import ChecksumError, DownloadError, download, sha256_file, verify_file
from data_prep.vocab import Vocabulary

SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "lm1b-sample"

# A tiny corpus in the release's format: tokenized, one sentence per line.
TRAIN_SHARDS = {
    "news.en-00001-of-00100": ["the cat sat .", "the dog sat .", "a cat ran ."],
    "news.en-00002-of-00100": ["the cat ran .", "the bird sat on the mat .", "a dog ran ."],
}
HELDOUT_SHARDS = {
    "news.en.heldout-00000-of-00050": ["the cat sat on a mat .", "the zebra ran ."],
    "news.en.heldout-00001-of-00050": ["a bird sat .", "the dog ran on the mat ."],
    "news.en.heldout-00002-of-00050": ["unused shard ."],
}


def _text(sentences: list[str]) -> bytes:
    return "".join(s + "\n" for s in sentences).encode()


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _official_archive() -> bytes:
    top = lm1b.ARCHIVE_TOP
    members = {f"{top}/README": b"not a shard\n"}
    for name, sentences in TRAIN_SHARDS.items():
        members[f"{top}/{lm1b.TRAIN_DIR}/{name}"] = _text(sentences)
    for name, sentences in HELDOUT_SHARDS.items():
        members[f"{top}/{lm1b.HELDOUT_DIR}/{name}"] = _text(sentences)
    return _tar_gz(members)


ARCHIVE = _official_archive()
ARCHIVE_SHA = hashlib.sha256(ARCHIVE).hexdigest()


class _Server:
    """A local HTTP server for `files` that honours `Range: bytes=N-` and records each request's
    Range header. `cut_after` makes the next response stop after that many body bytes;
    `ignore_range` answers 200 with the whole body whatever the request."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.ranges = files, []
        self.cut_after: int | None = None
        self.ignore_range = False
        state = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                data = state.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                header = self.headers.get("Range")
                state.ranges.append(header)
                start = 0
                if header and not state.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", header).group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if state.cut_after is not None:
                    body, state.cut_after = body[: state.cut_after], None
                    self.close_connection = True
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Requests to 127.0.0.1 must not go through a proxy configured for the machine."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def server():
    server = _Server({"/lm1b.tar.gz": ARCHIVE, "/blob": bytes(range(256)) * 40})
    yield server
    server.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = lm1b.main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _decode(folder: Path, split: str) -> list[list[str]]:
    """The split as sentences of words, split at </S>."""
    words = Vocabulary.load(folder / "vocab.txt").decode(read_split(folder, split).tolist())
    sentences, current = [], []
    for word in words:
        if word == "</S>":
            sentences.append(current)
            current = []
        else:
            current.append(word)
    assert not current, "a split must end with </S>"
    return sentences


def _expected(sentences: list[str], vocab: Vocabulary) -> list[list[str]]:
    return [[w if w in vocab.index else "<UNK>" for w in s.split()] for s in sentences]


def _flat(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


# --------------------------------------------------------------------------- download


def test_download_resumes_an_interrupted_transfer(server, tmp_path):
    blob = server.files["/blob"]
    server.cut_after = 3000
    dest = download(
        server.url("blob"),
        tmp_path / "blob",
        size=len(blob),
        sha256=hashlib.sha256(blob).hexdigest(),
        retry_wait=0,
        progress=False,
    )
    assert server.ranges == [None, "bytes=3000-"]  # the second request asked for the rest
    assert dest.read_bytes() == blob
    assert not (tmp_path / "blob.part").exists()


def test_download_resumes_a_part_file_and_restarts_when_range_is_ignored(server, tmp_path):
    blob = server.files["/blob"]
    sha = hashlib.sha256(blob).hexdigest()
    (tmp_path / "a.part").write_bytes(blob[:4000])
    download(server.url("blob"), tmp_path / "a", size=len(blob), sha256=sha, progress=False)
    assert server.ranges == ["bytes=4000-"]
    assert (tmp_path / "a").read_bytes() == blob

    server.ranges.clear()
    server.ignore_range = True
    (tmp_path / "b.part").write_bytes(b"garbage that is not a prefix")
    download(server.url("blob"), tmp_path / "b", size=len(blob), sha256=sha, progress=False)
    assert server.ranges == ["bytes=28-"]  # asked to resume, got 200: started from byte 0
    assert (tmp_path / "b").read_bytes() == blob


def test_download_checksum_mismatch_keeps_the_bytes(server, tmp_path):
    blob = server.files["/blob"]
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        download(server.url("blob"), tmp_path / "blob", sha256=wrong, progress=False)
    message = str(info.value)
    assert "blob" in message and wrong in message and hashlib.sha256(blob).hexdigest() in message
    assert (tmp_path / "blob.corrupt").read_bytes() == blob
    assert not (tmp_path / "blob").exists() and not (tmp_path / "blob.part").exists()


def test_download_errors(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url("missing"), tmp_path / "x", progress=False)
    with pytest.raises(DownloadError, match="offers 10,240 bytes, expected 5"):
        download(server.url("blob"), tmp_path / "x", size=5, progress=False)
    path = tmp_path / "file"
    path.write_bytes(b"abc")
    verify_file(path, 3, sha256_file(path))
    with pytest.raises(ChecksumError, match="size 3 bytes, expected 4"):
        verify_file(path, size=4)


# --------------------------------------------------------------------------- official archive


def test_download_and_prepare(server, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    cache.mkdir()
    (cache / "lm1b.tar.gz.part").write_bytes(ARCHIVE[: len(ARCHIVE) // 2])
    args = ["--out", out, "--cache", cache, "--url", server.url("lm1b.tar.gz")]
    args += ["--sha256", ARCHIVE_SHA, "--size", len(ARCHIVE), "--min-count", "1"]
    code, stdout, _ = _run(capsys, *args)
    assert code == 0
    assert server.ranges == [f"bytes={len(ARCHIVE) // 2}-"]  # resumed, not restarted
    assert (cache / "lm1b.tar.gz").read_bytes() == ARCHIVE
    folder = Path(stdout.strip().splitlines()[-1])
    assert folder.parent == out and folder.name.startswith("lm1b-")
    assert (out / "lm1b-latest").read_text() == folder.name + "\n"
    assert not list(out.glob("*.tmp"))

    meta = read_meta(folder)
    assert meta["dataset"] == "lm1b" and meta["recipe_id"] == folder.name[len("lm1b-") :]
    assert meta["splits"]["train"]["sources"] == list(TRAIN_SHARDS)
    assert meta["splits"]["valid"]["sources"] == ["news.en.heldout-00001-of-00050"]
    assert meta["splits"]["test"]["sources"] == ["news.en.heldout-00000-of-00050"]
    assert [s["name"] for s in meta["recipe"]["sources"]["train"]] == list(TRAIN_SHARDS)
    vocab = Vocabulary.load(folder / "vocab.txt")
    assert meta["vocab"]["size"] == len(vocab) and meta["vocab"]["min_count"] == 1
    assert meta["vocab"]["sha256"] == file_sha256(folder / "vocab.txt")
    train = [s for shard in TRAIN_SHARDS.values() for s in shard]
    inputs = {
        "train": train,
        "valid": HELDOUT_SHARDS["news.en.heldout-00001-of-00050"],
        "test": HELDOUT_SHARDS["news.en.heldout-00000-of-00050"],
    }
    for split in SPLITS:
        entry = meta["splits"][split]
        assert _decode(folder, split) == _expected(inputs[split], vocab)
        words = sum(len(s.split()) for s in inputs[split])
        assert entry["sentences"] == len(inputs[split])
        assert entry["tokens"] == words + len(inputs[split])
        assert entry["sha256"] == file_sha256(folder / entry["file"])
    assert "zebra" not in vocab.index and _decode(folder, "test")[1] == ["the", "<UNK>", "ran", "."]

    # Later runs reuse the extraction: no network needed, nothing rewritten.
    mtimes = _mtimes(folder)
    args[args.index("--url") + 1] = f"http://127.0.0.1:{_closed_port()}/lm1b.tar.gz"
    code, stdout, stderr = _run(capsys, *args)
    assert code == 0 and "up to date" in stderr and stdout.strip() == str(folder)
    assert _mtimes(folder) == mtimes


def test_corrupt_download_is_rejected(server, tmp_path, capsys):
    cache, out = tmp_path / "cache", tmp_path / "out"
    wrong = "ab" * 32
    code, stdout, stderr = _run(
        capsys, "--out", out, "--cache", cache, "--url", server.url("lm1b.tar.gz"),
        "--sha256", wrong, "--size", len(ARCHIVE),
    )  # fmt: skip
    assert code == 1 and stdout == ""  # a download that fails: 1, not the 2 of bad input
    assert stderr.count("\n") == 1 and stderr.startswith("error: lm1b.tar.gz: sha256 mismatch")
    assert wrong in stderr and ARCHIVE_SHA in stderr
    assert (cache / "lm1b.tar.gz.corrupt").read_bytes() == ARCHIVE  # kept for inspection
    assert not (cache / "lm1b.tar.gz").exists() and not out.exists()


def test_no_network_fails_fast_and_says_what_to_do(tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/lm1b.tar.gz"
    start = time.monotonic()
    code, _, stderr = _run(capsys, "--out", tmp_path / "out", "--cache", tmp_path, "--url", url)
    assert code == 1 and time.monotonic() - start < 5  # a runtime failure, not bad input
    assert "--source DIR" in stderr and "LM1B_DIR=DIR" in stderr and url in stderr


def test_archive_as_source(tmp_path, capsys):
    archive = tmp_path / "lm1b.tar.gz"
    archive.write_bytes(ARCHIVE)
    cache = tmp_path / "cache"
    base = ["--out", tmp_path / "out", "--cache", cache, "--source", archive]
    code, stdout, _ = _run(capsys, *base, "--sha256", ARCHIVE_SHA, "--size", len(ARCHIVE))
    assert code == 0
    assert read_meta(Path(stdout.strip()))["splits"]["test"]["sentences"] == 2

    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(ARCHIVE[:-100])
    base[-1] = truncated
    code, _, stderr = _run(capsys, *base, "--sha256", ARCHIVE_SHA, "--size", len(ARCHIVE))
    assert code == 2 and "expected" in stderr and stderr.count("\n") == 1
    # Even when the checksums given match it, a truncated archive is reported as such.
    sha = hashlib.sha256(ARCHIVE[:-100]).hexdigest()
    code, _, stderr = _run(capsys, *base, "--sha256", sha, "--size", len(ARCHIVE) - 100)
    assert code == 2 and "truncated or corrupt" in stderr
    assert not (cache / f"lm1b-{sha[:12]}").exists()


def test_unsafe_member_rejects_the_archive(tmp_path, capsys):
    for name in ("../evil", "/abs/evil"):
        data = _tar_gz({name: b"x\n", f"{lm1b.HELDOUT_DIR}/{lm1b.TEST_SHARD}": b"a b\n"})
        archive = tmp_path / "bad.tar.gz"
        archive.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        code, _, stderr = _run(
            capsys, "--out", tmp_path / "out", "--cache", tmp_path / "cache",
            "--source", archive, "--sha256", sha, "--size", len(data),
        )  # fmt: skip
        assert code == 2 and "unsafe member path" in stderr
    assert not (tmp_path / "evil").exists() and not (tmp_path / "cache" / "evil").exists()


def test_extracted_official_layout_as_source(tmp_path, capsys):
    source = tmp_path / "src" / lm1b.ARCHIVE_TOP
    for name, sentences in TRAIN_SHARDS.items():
        _flat(source / lm1b.TRAIN_DIR, {name: _text(sentences)})
    for name, sentences in HELDOUT_SHARDS.items():
        _flat(source / lm1b.HELDOUT_DIR, {name: _text(sentences)})
    code, stdout, _ = _run(capsys, "--out", tmp_path / "out", "--source", tmp_path / "src")
    assert code == 0
    meta = read_meta(Path(stdout.strip()))
    assert meta["source"]["layout"] == "official"
    assert meta["splits"]["valid"]["sources"] == ["news.en.heldout-00001-of-00050"]
    assert meta["vocab"]["min_count"] == 3  # the benchmark's default
    # Only '.' (6), 'the' (5), 'cat', 'ran' and 'sat' (3 each) are seen 3 times or more.
    assert Vocabulary.load(Path(stdout.strip()) / "vocab.txt").words == [
        "<S>", "</S>", "<UNK>", ".", "the", "cat", "ran", "sat",
    ]  # fmt: skip


# --------------------------------------------------------------------------- vocabulary, text

# Training counts: a 4, b 3, c 2, d 1, e 1.
TOY = {
    "news.en-00001-of-00100": b"a b c a\nb a d\n",
    "news.en-00002-of-00100": b"a e b c\n",
    "news.en.heldout-00000-of-00050": b"a c e f\n",
    "news.en.heldout-00001-of-00050": b"d d b\n",
}


@pytest.mark.parametrize(
    ("min_count", "max_vocab", "words"),
    [
        (3, None, ["a", "b"]),
        (2, None, ["a", "b", "c"]),
        (1, None, ["a", "b", "c", "d", "e"]),
        (1, 7, ["a", "b", "c", "d"]),  # d and e tie at 1: the word breaks the tie
        (1, 4, ["a"]),
        (2, 100, ["a", "b", "c"]),
    ],
)
def test_vocabulary_cut_offs(tmp_path, min_count, max_vocab, words):
    source = _flat(tmp_path / "src", TOY)
    folder = lm1b.prepare_lm1b(
        tmp_path / "out", source, min_count=min_count, max_vocab=max_vocab, progress=False
    )
    vocab = Vocabulary.load(folder / "vocab.txt")
    assert vocab.words == ["<S>", "</S>", "<UNK>", *words]
    assert vocab.counts == [0, 0, 0, *[{"a": 4, "b": 3, "c": 2, "d": 1, "e": 1}[w] for w in words]]
    ids = {w: i for i, w in enumerate(vocab.words)}
    expected = [ids.get(w, 2) for w in ["a", "c", "e", "f"]] + [1]
    assert read_split(folder, "test").tolist() == expected
    meta = read_meta(folder)
    assert meta["vocab"]["max_size"] == max_vocab and meta["vocab"]["size"] == len(vocab)
    assert meta["splits"]["test"]["unk_tokens"] == expected.count(2)


def test_bad_utf8_empty_lines_and_markers(tmp_path, capsys):
    source = _flat(
        tmp_path / "src",
        {
            "news.en-00001-of-00100": b"a b\n\n   \na \xff b\nb <S> a </S>\n\n",
            "news.en.heldout-00000-of-00050": b"a b\n\xfe\xfe\n",
            "news.en.heldout-00001-of-00050": b"\nb\n",
        },
    )
    code, stdout, stderr = _run(capsys, "--out", tmp_path / "out", "--source", source)
    assert code == 0
    folder = Path(stdout.strip())
    splits = read_meta(folder)["splits"]
    assert (splits["train"]["replaced_lines"], splits["train"]["empty_lines"]) == (1, 3)
    assert (splits["test"]["replaced_lines"], splits["test"]["empty_lines"]) == (1, 0)
    assert (splits["valid"]["replaced_lines"], splits["valid"]["empty_lines"]) == (0, 1)
    assert "news.en-00001-of-00100: 1 lines with invalid UTF-8" in stderr
    assert "news.en-00001-of-00100: 3 empty lines skipped" in stderr
    assert "news.en.heldout-00000-of-00050: 1 lines with invalid UTF-8" in stderr
    # The replaced byte is a word (U+FFFD, seen once: <UNK>); literal markers become <UNK>.
    assert _decode(folder, "train") == [
        ["a", "b"], ["a", "<UNK>", "b"], ["b", "<UNK>", "a", "<UNK>"],
    ]  # fmt: skip
    assert splits["train"]["tokens"] == 9 + 3


def test_flat_folder_defaults_carve_validation(tmp_path, capsys):
    train_a = [f"w{i} common" for i in range(6)]
    train_b = ["common w0", "only_in_valid common", "last common"]
    source = _flat(
        tmp_path / "src",
        {
            "news.en.heldout-00000-of-00050": b"common w1\n",
            "news.en.heldout-00010+00011-of-00050.concat": _text(train_a),
            "news.en.heldout-00012+00013-of-00050.concat": _text(train_b),
        },
    )
    out = tmp_path / "out"
    code, stdout, _ = _run(
        capsys, "--out", out, "--source", source, "--valid-sentences", 2, "--min-count", 1
    )
    assert code == 0
    folder = Path(stdout.strip())
    meta = read_meta(folder)
    assert meta["source"]["layout"] == "flat"
    assert meta["splits"]["valid"]["carved_from_train"] == 2
    assert meta["splits"]["valid"]["sources"] == ["news.en.heldout-00012+00013-of-00050.concat"]
    vocab = Vocabulary.load(folder / "vocab.txt")
    assert "only_in_valid" not in vocab.index and "last" not in vocab.index
    assert _decode(folder, "train") == [s.split() for s in [*train_a, "common w0"]]
    assert _decode(folder, "valid") == [["<UNK>", "common"], ["<UNK>", "common"]]
    assert meta["splits"]["train"]["sentences"] == 7 and meta["splits"]["valid"]["tokens"] == 6

    # The explicit choice of training files gives the same recipe, hence the same folder.
    code, stdout, stderr = _run(
        capsys, "--out", out, "--source", source, "--train", "news.en.heldout-0001*",
        "--valid-sentences", 2, "--min-count", 1,
    )  # fmt: skip
    assert code == 0 and "up to date" in stderr and Path(stdout.strip()) == folder
    # Too few sentences to carve.
    code, _, stderr = _run(capsys, "--out", out, "--source", source, "--valid-sentences", 9)
    assert code == 2 and "cannot carve 9" in stderr


def test_split_selection_errors(tmp_path, capsys):
    source = _flat(tmp_path / "src", TOY)
    base = ["--out", tmp_path / "out", "--source", source]
    code, _, stderr = _run(capsys, *base, "--train", "nothing*")
    assert code == 2 and "'nothing*' matches no file" in stderr
    code, _, stderr = _run(capsys, *base, "--train", "news.en*")
    assert code == 2 and "selected for both train and" in stderr
    code, _, stderr = _run(
        capsys, *base, "--valid", "news.en.heldout-00001*", "--valid-sentences", 1
    )
    assert code == 2 and "not both" in stderr
    code, _, stderr = _run(capsys, *base, "--source", tmp_path / "nowhere")
    assert code == 2 and "does not exist" in stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "a-file").write_text("")
    code, _, stderr = _run(capsys, *base, "--out", tmp_path / "a-file")
    assert code == 2 and stderr.startswith("error: ") and "a-file" in stderr
    with pytest.raises(SystemExit) as usage:
        _run(capsys, *base, "--sha256", "not-hex")
    assert usage.value.code == 2


@pytest.mark.parametrize("blank", [b"", b"\n \n"])
@pytest.mark.parametrize("shard", ["news.en-00001-of-00100", "news.en.heldout-00001-of-00050"])
def test_an_empty_split_is_refused(tmp_path, capsys, shard, blank):
    source = _flat(tmp_path / "src", {**TOY, shard: blank})
    base = ["--out", tmp_path / "out", "--source", source, "--train", shard]
    if "heldout" in shard:  # the validation shard, with one training shard
        base[-1] = "news.en-00001-of-00100"
    code, stdout, stderr = _run(capsys, *base)
    split = "valid" if "heldout" in shard else "train"
    reason = "hold no text" if not blank else "has no sentences"
    error = stderr.splitlines()[-1]  # after the notes about the vocabulary and empty lines
    assert code == 2 and stdout == "" and stderr.count("error:") == 1
    assert error.startswith(f"error: the {split} split ") and reason in error
    assert str(source / shard) in error
    assert not list((tmp_path / "out").glob("lm1b-*"))  # no folder, no lm1b-latest


def test_idempotent_and_a_changed_recipe_gets_a_new_folder(tmp_path, capsys):
    source = _flat(tmp_path / "src", TOY)
    out = tmp_path / "out"
    code, stdout, _ = _run(capsys, "--out", out, "--source", source)
    first = Path(stdout.strip())
    mtimes = _mtimes(first)
    code, stdout, stderr = _run(capsys, "--out", out, "--source", source)
    assert code == 0 and "up to date" in stderr and Path(stdout.strip()) == first
    assert _mtimes(first) == mtimes

    code, stdout, _ = _run(capsys, "--out", out, "--source", source, "--min-count", 1)
    second = Path(stdout.strip())
    assert code == 0 and second != first and first.is_dir() and _mtimes(first) == mtimes
    assert (out / "lm1b-latest").read_text() == second.name + "\n"

    # A source file that changes size changes the recipe too.
    (source / "news.en-00002-of-00100").write_bytes(b"a e b c\nc\n")
    code, stdout, _ = _run(capsys, "--out", out, "--source", source, "--min-count", 1)
    assert code == 0 and Path(stdout.strip()) not in (first, second)

    # A damaged folder (a truncated split) is rebuilt, and a stale .tmp is cleaned.
    (second / "train.bin").write_bytes(b"")
    (out / f"{second.name}.tmp").mkdir()
    (source / "news.en-00002-of-00100").write_bytes(TOY["news.en-00002-of-00100"])
    code, stdout, stderr = _run(capsys, "--out", out, "--source", source, "--min-count", 1)
    assert code == 0 and "up to date" not in stderr and Path(stdout.strip()) == second
    assert read_split(second, "train").size == read_meta(second)["splits"]["train"]["tokens"]
    assert not list(out.glob("*.tmp"))


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as info:
        lm1b.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--source", "--train", "--valid", "--test", "--valid-sentences"):
        assert option in text
    for option in ("--min-count", "--max-vocab", "--cache", "--url", "--sha256", "--size"):
        assert option in text


def test_help_names_no_path_of_this_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per paragraph: no path cut by wrapping
    text = lm1b.build_parser().format_help()
    # An absolute path after a space, quote or parenthesis (URLs have ':' before their '/').
    assert re.findall(r"(?:^|[\s'\"`(=])(/[\w.-]+)", text) == []
    # The same text wherever it is run from, whoever runs it.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert lm1b.build_parser().format_help() == text


# --------------------------------------------------------------------------- the real sample


@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} not present")
def test_lm1b_sample(tmp_path, capsys):
    code, stdout, _ = _run(
        capsys, "--out", tmp_path, "--source", SAMPLE,
        "--train", "news.en.heldout-0001*", "--valid-sentences", 2000,
    )  # fmt: skip
    assert code == 0
    meta = read_meta(Path(stdout.strip()))
    test = meta["splits"]["test"]
    assert (test["sentences"], test["tokens"]) == (6075, 159658)
    assert test["sources"] == ["news.en.heldout-00000-of-00050"]
    train, valid = meta["splits"]["train"], meta["splits"]["valid"]
    # Held-out shards 10-13: 12,216 + 12,105 sentences, 322,706 + 318,286 tokens.
    assert train["sentences"] + valid["sentences"] == 12216 + 12105
    assert train["tokens"] + valid["tokens"] == 322706 + 318286
    assert valid["sentences"] == 2000
    assert os.path.getsize(Path(stdout.strip()) / "test.bin") == 159658 * 2  # uint16
