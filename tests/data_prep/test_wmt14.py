"""data_prep.wmt14: the archives and trees of the official layout (built here, tiny, with the
real member names), downloads from a local HTTP server with hashes recorded on first use, no
network, SGML test sets, and the real newstest sets of ../shared when present."""

import gzip
import hashlib
import io
import random
import tarfile
import time
from pathlib import Path

import pytest

from data_prep import wmt14
from data_prep.wmt14 import ARCHIVES, MEMBERS, Archive, sgm_text
from lstm_moe.pairs import read_pairs, read_parallel_meta
from tests.data_prep.test_lm1b import _closed_port, _Server

NEWSTEST = Path(__file__).resolve().parents[3] / "shared" / "data" / "wmt14"

EN = ["the", "a", "house", "garden", "dog", "runs", "sees", "small", "and", "."]
XX = {
    "de": ["der", "ein", "Haus", "Garten", "Hund", "läuft", "sieht", "klein", "und", "."],
    "fr": ["le", "une", "maison", "jardin", "chien", "court", "voit", "petit", "et", "."],
}


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Requests to 127.0.0.1 must not go through a proxy configured for the machine."""
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


def _text(rng: random.Random, xx: str, n: int) -> tuple[bytes, bytes]:
    en, other = [], []
    for _ in range(n):
        picks = [rng.randrange(len(EN)) for _ in range(rng.randint(2, 6))]
        en.append(" ".join(EN[i] for i in picks) + "\n")
        other.append(" ".join(XX[xx][i] for i in picks) + "\n")
    return "".join(en).encode(), "".join(other).encode()


def _sgm(sentences: list[str], kind: str, lang: str) -> bytes:
    lines = [f'<{kind}set setid="newstest2014" srclang="any" trglang="{lang}">']
    lines.append('<doc sysid="ref" docid="1" genre="news" origlang="en">')
    lines += [f'<seg id="{i}"> {s}\u00a0 </seg>' for i, s in enumerate(sentences, 1)]
    lines += ["</doc>", f"</{kind}set>"]
    return ("\n".join(lines) + "\n").encode()


def _tar(members: dict[str, bytes], compressed: bool = True) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compressed else "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def official_files(seed: int = 0) -> dict[str, bytes]:
    """Every member of the table, tiny: member path -> bytes."""
    rng = random.Random(seed)
    files = {}
    for pair, members in MEMBERS.items():
        xx = pair.split("-")[1]
        for m in members:
            if m.split == "test":
                en, other = _text(rng, xx, 6)
                files[m.en] = _sgm(en.decode().splitlines(), "src", "en")
                files[m.other] = _sgm(other.decode().splitlines(), "ref", xx)
            else:
                en, other = _text(rng, xx, 40 if m.split == "train" else 5)
                if m.en.endswith(".gz"):
                    en, other = gzip.compress(en, mtime=0), gzip.compress(other, mtime=0)
                files[m.en], files[m.other] = en, other
    return files


def official_archives(files: dict[str, bytes]) -> dict[str, bytes]:
    """The archives of the table (archive key -> bytes), with a member no pair reads."""
    members: dict[str, dict[str, bytes]] = {key: {} for key in ARCHIVES}
    for pair_members in MEMBERS.values():
        for m in pair_members:
            members[m.archive][m.en] = files[m.en]
            members[m.archive][m.other] = files[m.other]
    members["commoncrawl"]["commoncrawl.de-en.annotation"] = b"not text\n"
    return {key: _tar(m, compressed=key != "giga-fren") for key, m in members.items()}


def fake_table(archives: dict[str, bytes], published=("europarl", "commoncrawl", "nc-v9")):
    """ARCHIVES with the published sizes and hashes of the fake archives."""
    table = {}
    for key, archive in ARCHIVES.items():
        data = archives[key]
        if key in published:
            table[key] = Archive(archive.path, len(data), hashlib.sha256(data).hexdigest())
        else:
            table[key] = Archive(archive.path)
    return table


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = wmt14.main([*map(str, argv), "--no-progress", "--vocab-size", "60"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


FILES = official_files()
ARCHIVE_BYTES = official_archives(FILES)


# --------------------------------------------------------------------------- downloads


def test_download_extract_prepare_and_reuse(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(wmt14, "ARCHIVES", fake_table(ARCHIVE_BYTES))
    server = _Server({f"/{a.path}": ARCHIVE_BYTES[k] for k, a in ARCHIVES.items()})
    try:
        cache, out = tmp_path / "cache", tmp_path / "out"
        base = ["--out", out, "--cache", cache, "--pair", "en-de"]
        code, stdout, stderr = _run(capsys, *base, "--url-base", server.url(""))
        assert code == 0, stderr
        folder = Path(stdout.splitlines()[-1])
        assert folder.parent == out and folder.name.startswith("wmt14-en-de-")
        # Only the archives of en-de, each fetched once.
        assert server.ranges == [None] * 5
        assert not (cache / "training-parallel-un.tgz").exists()
        recorded = wmt14.read_json(cache / wmt14.CHECKSUMS)
        assert recorded == {
            name: {"size": len(ARCHIVE_BYTES[key]),
                   "sha256": hashlib.sha256(ARCHIVE_BYTES[key]).hexdigest()}
            for key, name in (("dev", "dev.tgz"), ("test-full", "test-full.tgz"))
        }  # fmt: skip
        meta = read_parallel_meta(folder)
        assert (meta["src_lang"], meta["tgt_lang"]) == ("en", "de")
        assert meta["splits"]["valid"]["pairs"] == 10  # newstest2012 then newstest2013
        valid = (folder / "valid.de").read_bytes()
        assert valid == FILES["dev/newstest2012.de"] + FILES["dev/newstest2013.de"]
        assert meta["splits"]["test"]["pairs"] == 6
        refs = (folder / "test.de").read_text().splitlines()
        assert refs == sgm_text_of(FILES["test-full/newstest2014-deen-ref.de.sgm"], tmp_path)
        assert meta["splits"]["train"]["lines"] == 120  # three corpora of 40 pairs
        assert [s["src"] for s in meta["recipe"]["sources"]["train"]] == [
            "europarl-v7.de-en.en", "commoncrawl.de-en.en", "news-commentary-v9.de-en.en",
        ]  # fmt: skip
        read_pairs(folder, "train")

        # Later runs need neither the network nor the archives.
        for archive in cache.glob("*.t*"):
            archive.unlink()
        closed = f"http://127.0.0.1:{_closed_port()}/"
        code, stdout, stderr = _run(capsys, *base, "--url-base", closed)
        assert code == 0 and "up to date" in stderr and stdout.splitlines()[-1] == str(folder)

        # A later download of an archive with a recorded hash is verified against it.
        for extraction in cache.glob("wmt14-dev-*"):
            wmt14.shutil.rmtree(extraction)
        changed = bytearray(ARCHIVE_BYTES["dev"])
        changed[len(changed) // 2] ^= 1  # the same size, other bytes
        server.files["/wmt14/dev.tgz"] = bytes(changed)
        code, stdout, stderr = _run(capsys, *base, "--url-base", server.url(""))
        assert code == 1 and stdout == "" and stderr.count("\n") == 1
        assert "dev.tgz: sha256 mismatch" in stderr
        assert recorded["dev.tgz"]["sha256"] in stderr
    finally:
        server.close()


def sgm_text_of(data: bytes, tmp_path: Path) -> list[str]:
    path = tmp_path / "x.sgm"
    path.write_bytes(data)
    return sgm_text(path)


def test_no_network_fails_fast_and_says_what_to_do(tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/"
    start = time.monotonic()
    code, stdout, stderr = _run(capsys, "--out", tmp_path / "out", "--cache", tmp_path / "c",
                                "--url-base", url)  # fmt: skip
    assert code == 1 and stdout == "" and time.monotonic() - start < 5
    assert stderr.count("\n") == 1 and stderr.startswith("error: cannot download WMT'14")
    assert "--source DIR" in stderr and "WMT14_DIR=DIR" in stderr and url in stderr
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- local copies


def test_archives_as_source_en_fr(tmp_path, capsys, monkeypatch):
    """UN and the 10^9 corpus too, the latter an uncompressed tar of gzipped members."""
    monkeypatch.setattr(wmt14, "ARCHIVES", fake_table(ARCHIVE_BYTES))
    source = tmp_path / "wmt14"
    source.mkdir()
    for key, archive in ARCHIVES.items():
        (source / archive.name).write_bytes(ARCHIVE_BYTES[key])
    cache = tmp_path / "cache"
    base = ["--out", tmp_path / "out", "--cache", cache, "--source", source, "--pair", "en-fr"]
    code, stdout, stderr = _run(capsys, *base)
    assert code == 0, stderr
    meta = read_parallel_meta(Path(stdout.splitlines()[-1]))
    assert meta["tgt_lang"] == "fr" and meta["splits"]["train"]["lines"] == 5 * 40
    assert meta["recipe"]["sources"]["train"][-1]["tgt"] == "giga-fren.release2.fixed.fr.gz"
    assert set(wmt14.read_json(cache / wmt14.CHECKSUMS)) == {
        "training-parallel-un.tgz", "training-giga-fren.tar", "dev.tgz", "test-full.tgz",
    }  # fmt: skip

    # A copy that differs from the recorded one is refused as bad input.
    (source / "training-parallel-un.tgz").write_bytes(ARCHIVE_BYTES["un"] + b"x")
    for extraction in cache.glob("wmt14-training-parallel-un-*"):
        wmt14.shutil.rmtree(extraction)
    code, _, stderr = _run(capsys, *base)
    assert code == 2 and stderr.count("\n") == 1 and "training-parallel-un.tgz: size" in stderr


def _tree(root: Path, pair: str, files: dict[str, bytes]) -> Path:
    for m in MEMBERS[pair]:
        for name in (m.en, m.other):
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[name])
    return root


def test_extracted_tree_as_source(tmp_path, capsys):
    source = _tree(tmp_path / "wmt14", "en-de", FILES)
    # Common Crawl moved into training/, the way some preparation scripts leave it.
    for name in ("commoncrawl.de-en.en", "commoncrawl.de-en.de"):
        (source / name).rename(source / "training" / name)
    code, stdout, stderr = _run(capsys, "--out", tmp_path / "out", "--cache", tmp_path / "c",
                                "--source", source)  # fmt: skip
    assert code == 0, stderr
    meta = read_parallel_meta(Path(stdout.splitlines()[-1]))
    assert meta["splits"]["train"]["lines"] == 120 and meta["splits"]["test"]["pairs"] == 6
    assert not list((tmp_path / "c").glob("wmt14-training-*"))  # nothing extracted

    (source / "training" / "commoncrawl.de-en.de").unlink()
    code, _, stderr = _run(capsys, "--out", tmp_path / "out", "--cache", tmp_path / "c",
                           "--source", source)  # fmt: skip
    assert code == 2 and stderr.count("\n") == 1
    assert "commoncrawl.de-en.de is not in --source" in stderr
    assert "training-parallel-commoncrawl.tgz" in stderr


@pytest.mark.skipif(not NEWSTEST.is_dir(), reason=f"{NEWSTEST} not present")
def test_real_newstest_sets(tmp_path, capsys):
    """The real dev and test sets in the official tree (tiny generated training data): the
    SGML reading gives sacreBLEU's text, the published plain-text newstest2014."""
    files = dict(FILES)
    for year in (2012, 2013):
        for lang in ("en", "de"):
            files[f"dev/newstest{year}.{lang}"] = (NEWSTEST / f"newstest{year}.{lang}").read_bytes()
    for name in ("newstest2014-deen-src.en.sgm", "newstest2014-deen-ref.de.sgm"):
        files[f"test-full/{name}"] = gzip.decompress((NEWSTEST / "sgm" / f"{name}.gz").read_bytes())
    source = _tree(tmp_path / "wmt14", "en-de", files)
    code, stdout, stderr = _run(capsys, "--out", tmp_path / "out", "--cache", tmp_path / "c",
                                "--source", source)  # fmt: skip
    assert code == 0, stderr
    folder = Path(stdout.splitlines()[-1])
    meta = read_parallel_meta(folder)
    assert meta["splits"]["test"]["pairs"] == 3003 and meta["splits"]["valid"]["pairs"] == 6003
    assert (folder / "test.en").read_bytes() == (NEWSTEST / "newstest2014.en-de.en").read_bytes()
    assert (folder / "test.de").read_bytes() == (NEWSTEST / "newstest2014.en-de.de").read_bytes()
    valid_en = (NEWSTEST / "newstest2012.en").read_bytes() + (
        NEWSTEST / "newstest2013.en"
    ).read_bytes()
    assert (folder / "valid.en").read_bytes() == valid_en
    assert len(read_pairs(folder, "test")) == 3003


def test_sgm_text(tmp_path):
    path = tmp_path / "t.sgm"
    path.write_bytes(
        b'<refset setid="x">\n<doc docid="d">\n<p>\n<seg id="1">  a \t b\xc2\xa0c  </seg>\n'
        b'<seg id="2"></seg>\n</p>\n<seg id="3">x &amp; y</seg> \n</doc>\n</refset>\n'
    )
    assert sgm_text(path) == ["a b c", "", "x &amp; y"]  # as sacreBLEU: entities stay
    gz = tmp_path / "t.sgm.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert sgm_text(gz) == sgm_text(path)
    path.write_text("no segments\n")
    with pytest.raises(wmt14.PrepareError, match="no <seg> lines"):
        sgm_text(path)


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        wmt14.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--pair", "--source", "--cache", "--url-base", "--vocab-size"):
        assert option in text
