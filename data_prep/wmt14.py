"""WMT'14 English→German and English→French, the translation data of the paper's §5.3, from the
official statmt.org archives, binarized by data_prep.parallel.

Command: `python -m data_prep.wmt14 --out data --pair en-de|en-fr [--source DIR] [options]`
(see `--help`). The folder `OUT/wmt14-en-<xx>-<recipe_id>/` is the last line on stdout.

What goes in. Training: the WMT'14 constrained parallel data of the pair; validation:
newstest2012 followed by newstest2013; test: the full newstest2014 (3,003 sentences for both
pairs, sacreBLEU's `wmt14/full`). The member files of each archive:

  split corpus         archive, under http://www.statmt.org/       members, xx = de or fr
  train Europarl v7    wmt13/training-parallel-europarl-v7.tgz   training/europarl-v7.xx-en.{en,xx}
  train Common Crawl   wmt13/training-parallel-commoncrawl.tgz   commoncrawl.xx-en.{en,xx}
  train News Comm. v9  wmt14/training-parallel-nc-v9.tgz  training/news-commentary-v9.xx-en.{en,xx}
  train UN (fr only)   wmt13/training-parallel-un.tgz            un/undoc.2000.fr-en.{en,fr}
  train 10^9 (fr only) wmt10/training-giga-fren.tar              giga-fren.release2.fixed.{en,fr}.gz
  valid newstest2012   wmt14/dev.tgz                             dev/newstest2012.{en,xx}
  valid newstest2013   wmt14/dev.tgz                             dev/newstest2013.{en,xx}
  test  newstest2014   wmt14/test-full.tgz                  test-full/newstest2014-xxen-src.en.sgm
                                                            test-full/newstest2014-xxen-ref.xx.sgm

(`ARCHIVES` and `MEMBERS` below are this table.) The test sets are SGML: the text of each `<seg>`
line, stripped, its whitespace runs collapsed to one space, as sacreBLEU reads them (written to
`<cache>/wmt14-newstest2014/`), so the references kept in the folder are sacreBLEU's.

Where the files come from
  * `--source DIR`, a local copy in the official layout: each member is looked for at
    `DIR/<member>` (the trees the archives extract to, side by side in DIR), at
    `DIR/<member's file name>` or at `DIR/training/<member's file name>` (where some scripts
    move Common Crawl), gzipped or not; a member not found there is extracted from the archive
    `DIR/<archive name>`. Nothing is downloaded.
  * Otherwise the archives the pair needs are downloaded into `--cache` (data_prep.download:
    streamed, resumed after an interruption, checksummed, with a progress bar), then their
    members are extracted, streamed, into `<cache>/wmt14-<archive>-<sha256[:12]>/`. A later run
    finds the extraction (complete once its `extracted.json` lists the member) and needs
    neither the network nor the archive. Without network, the command stops within seconds
    and says how to give a local copy.
  Checksums. Europarl, Common Crawl and News Commentary have a published size and sha256,
  checked on every download. The other archives have none: the sha256 computed on the first
  download (or first use of a `--source` archive) is recorded in `<cache>/wmt14-sha256.json`
  and every later copy is verified against it.

Then data_prep.parallel does the rest (its docstring): Moses normalisation, a shared
sentencepiece vocabulary (32,000 BPE pieces by default, sampled from at most a million
training pairs), training pairs filtered by length and ratio, valid and test kept whole with
their untouched text. Memory stays bounded throughout: archives, members and corpora are
streamed.
"""

from __future__ import annotations

import argparse
import gzip
import re
import shutil
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from data_prep.download import (
    ChecksumError,
    DownloadError,
    NetworkUnavailable,
    check_reachable,
    download,
    sha256_file,
    verify_file,
)
from data_prep.parallel import (
    SPLITS,
    FilePair,
    ParallelConfig,
    PrepareError,
    add_config_arguments,
    config_from_args,
    prepare_parallel,
    raw_lines,
)
from data_prep.wordpieces import VocabularyError
from lstm_moe.files import PATH_ERRORS, read_json, write_json_atomic, write_text_atomic

URL_BASE = "http://www.statmt.org/"
PAIRS = ("en-de", "en-fr")
CHECKSUMS = "wmt14-sha256.json"  # in the cache: sizes and hashes recorded on first download
_EXTRACTED = "extracted.json"  # in an extraction folder: the members it holds


@dataclass(frozen=True)
class Archive:
    """One statmt.org archive: its URL path under the base, and its published size and sha256
    (None where none is published: recorded on first download instead)."""

    path: str
    size: int | None = None
    sha256: str | None = None

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name


ARCHIVES = {
    "europarl": Archive(
        "wmt13/training-parallel-europarl-v7.tgz",
        657_632_379,
        "0224c7c710c8a063dfd893b0cc0830202d61f4c75c17eb8e31836103d27d96e7",
    ),
    "commoncrawl": Archive(
        "wmt13/training-parallel-commoncrawl.tgz",
        918_311_367,
        "c7a74e2ea01ac6c920123108627e35278d4ccb5701e15428ffa34de86fa3a9e5",
    ),
    "nc-v9": Archive(
        "wmt14/training-parallel-nc-v9.tgz",
        80_418_416,
        "cb8953f292298e6877ae433c98912b927cb0766b303f4540512ddd286c748485",
    ),
    "un": Archive("wmt13/training-parallel-un.tgz"),
    "giga-fren": Archive("wmt10/training-giga-fren.tar"),
    "dev": Archive("wmt14/dev.tgz"),
    "test-full": Archive("wmt14/test-full.tgz"),
}


@dataclass(frozen=True)
class Member:
    """A line-aligned pair of files inside one archive: English, then the other language."""

    split: str
    corpus: str
    archive: str  # a key of ARCHIVES
    en: str
    other: str


def _members(xx: str) -> list[Member]:
    """The table of the module docstring for the pair en-xx."""
    members = [
        Member("train", "europarl-v7", "europarl", *_both(f"training/europarl-v7.{xx}-en", xx)),
        Member("train", "commoncrawl", "commoncrawl", *_both(f"commoncrawl.{xx}-en", xx)),
        Member(
            "train",
            "news-commentary-v9",
            "nc-v9",
            *_both(f"training/news-commentary-v9.{xx}-en", xx),
        ),
    ]
    if xx == "fr":
        members += [
            Member("train", "un", "un", *_both("un/undoc.2000.fr-en", xx)),
            Member(
                "train",
                "giga-fren",
                "giga-fren",
                "giga-fren.release2.fixed.en.gz",
                "giga-fren.release2.fixed.fr.gz",
            ),
        ]
    code = f"{xx}en"  # deen, fren
    return [
        *members,
        Member("valid", "newstest2012", "dev", *_both("dev/newstest2012", xx)),
        Member("valid", "newstest2013", "dev", *_both("dev/newstest2013", xx)),
        Member(
            "test",
            "newstest2014",
            "test-full",
            f"test-full/newstest2014-{code}-src.en.sgm",
            f"test-full/newstest2014-{code}-ref.{xx}.sgm",
        ),
    ]


def _both(stem: str, xx: str) -> tuple[str, str]:
    return f"{stem}.en", f"{stem}.{xx}"


MEMBERS = {pair: _members(pair.split("-")[1]) for pair in PAIRS}


# --------------------------------------------------------------------------- checksums


class Checksums:
    """Published sizes and hashes, and those recorded on first download (CHECKSUMS)."""

    def __init__(self, cache: Path, archives: dict[str, Archive]):
        self.path = Path(cache) / CHECKSUMS
        self.archives = archives
        self.recorded = read_json(self.path) if self.path.is_file() else {}

    def expected(self, key: str) -> tuple[int | None, str | None]:
        archive = self.archives[key]
        if archive.sha256 is not None:
            return archive.size, archive.sha256
        entry = self.recorded.get(archive.name, {})
        return entry.get("size"), entry.get("sha256")

    def record(self, key: str, path: Path, progress: bool) -> str:
        """The sha256 of `path`, recorded as the one every later copy must have."""
        sha = sha256_file(path, progress=progress)
        name = self.archives[key].name
        self.recorded[name] = {"size": path.stat().st_size, "sha256": sha}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, dict(sorted(self.recorded.items())))
        print(f"recorded sha256 {sha} of {name} in {self.path}", file=sys.stderr)
        return sha


# --------------------------------------------------------------------------- extraction


def _member_name(name: str) -> str:
    return name[2:] if name.startswith("./") else name


def extract_members(archive: Path, names: set[str], dest: Path, progress: bool = True) -> None:
    """Extract the members `names` of a tar archive (gzipped or not) into `dest/<name>`,
    streamed one member at a time, and list them in `dest/extracted.json` (written last).

    Paths in dest come from `names`, never from the archive. A member already listed is left
    alone; one missing from the archive is a PrepareError naming it."""
    dest = Path(dest)
    listed = _extracted(dest)
    wanted = set(names) - listed
    if not wanted:
        return
    found: set[str] = set()
    try:
        with (
            open(archive, "rb") as raw,
            tqdm(
                total=archive.stat().st_size,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"extract {archive.name}",
                disable=not progress,
            ) as bar,
        ):
            reader = _Progress(raw, bar)
            with tarfile.open(fileobj=reader, mode="r|*") as tar:
                for member in tar:
                    name = _member_name(member.name)
                    if name not in wanted or not member.isfile():
                        continue
                    target = dest / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    tmp = target.with_name(target.name + ".tmp")
                    with tar.extractfile(member) as source, open(tmp, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
                    tmp.replace(target)
                    found.add(name)
                    if found == wanted:
                        break
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise PrepareError(f"{archive} is truncated or corrupt ({error})") from error
    missing = wanted - found
    if missing:
        raise PrepareError(f"{archive} has no member {', '.join(sorted(missing))}")
    write_json_atomic(
        dest / _EXTRACTED, {"archive": archive.name, "members": sorted(listed | found)}
    )


def _extracted(dest: Path) -> set[str]:
    """The members listed in an extraction folder that are still there."""
    path = Path(dest) / _EXTRACTED
    listed = read_json(path)["members"] if path.is_file() else []
    return {name for name in listed if (Path(dest) / name).is_file()}


class _Progress:
    """A file wrapper that advances a progress bar by the bytes read through it."""

    def __init__(self, file, bar: tqdm):
        self.file, self.bar = file, bar

    def read(self, n: int = -1) -> bytes:
        data = self.file.read(n)
        self.bar.update(len(data))
        return data


# --------------------------------------------------------------------------- finding members


def _in_tree(source: Path, member: str) -> Path | None:
    """Where an extracted member lies in a local copy, if it does (see the module docstring)."""
    name = PurePosixPath(member).name
    places = [source / member, source / name, source / "training" / name]
    for place in places:
        variants = [place, place.with_name(place.name.removesuffix(".gz"))]
        if not place.name.endswith(".gz"):
            variants = [place, place.with_name(place.name + ".gz")]
        for path in variants:
            if path.is_file():
                return path
    return None


class Fetcher:
    """Finds the member files of a pair: in a local copy, in an extraction in the cache, or in
    an archive (local, or downloaded first) that it extracts."""

    def __init__(
        self,
        source: Path | None,
        cache: Path,
        url_base: str,
        archives: dict[str, Archive],
        progress: bool,
    ):
        self.source = None if source is None else Path(source)
        self.cache = Path(cache)
        self.url_base = url_base if url_base.endswith("/") else url_base + "/"
        self.archives = archives
        self.progress = progress
        self.checksums = Checksums(cache, archives)
        self.probed = False

    def member(self, key: str, member: str, names: set[str]) -> Path:
        """The file of `member` (of archive `key`); `names` are the archive's members this pair
        needs, extracted together when the archive has to be read."""
        if self.source is not None:
            found = _in_tree(self.source, member)
            if found is not None:
                return found
        dest = self._extraction(key)
        if dest is None or member not in _extracted(dest):
            archive = self._archive(key, member)
            dest = self._extraction(key)
            extract_members(archive, names, dest, self.progress)
        return dest / member

    def _extraction(self, key: str) -> Path | None:
        sha = self.checksums.expected(key)[1]
        if sha is None:
            return None
        stem = self.archives[key].name.split(".")[0]
        return self.cache / f"wmt14-{stem}-{sha[:12]}"

    def _archive(self, key: str, member: str) -> Path:
        """The verified archive: the local copy's, or a download into the cache."""
        archive = self.archives[key]
        size, sha = self.checksums.expected(key)
        if self.source is not None:
            path = self.source / archive.name
            if not path.is_file():
                raise PrepareError(
                    f"{member} is not in --source {self.source} (looked for {member}, its file"
                    f" name, and training/<file name>, gzipped or not), nor is the archive"
                    f" {archive.name} it comes from"
                )
            dest = self._extraction(key)
            extracted = dest is not None and (dest / _EXTRACTED).is_file()
            try:
                verify_file(path, size, None if extracted else sha, progress=self.progress)
            except ChecksumError as error:  # the user's file, not a download: bad input
                raise PrepareError(f"{error} (the copy in --source differs)") from error
            if sha is None:
                self.checksums.record(key, path, self.progress)
            return path
        if not self.probed:  # fail fast without network, before any transfer starts
            try:
                check_reachable(self.url_base)
            except NetworkUnavailable as error:
                raise NetworkUnavailable(_no_network(self.url_base, error)) from error
            self.probed = True
        path = download(
            self.url_base + archive.path,
            self.cache / archive.name,
            size=size,
            sha256=sha,
            progress=self.progress,
        )
        if sha is None:
            self.checksums.record(key, path, self.progress)
        return path


def _no_network(url_base: str, error: Exception) -> str:
    names = ", ".join(archive.name for archive in ARCHIVES.values())
    return (
        f"cannot download WMT'14 from {url_base} ({error}) and no --source was given. Provide a"
        f" local copy with --source DIR (make: WMT14_DIR=DIR): a folder holding the official"
        f" archives ({names}) or the trees they extract to (training/europarl-v7.de-en.en, ...)"
    )


# --------------------------------------------------------------------------- the test sets

_SEG = re.compile(r"<seg.*?>(.*)</seg>.*?")


def sgm_text(path: Path) -> list[str]:
    """The sentences of a WMT SGML file: each `<seg ...>` line's text, stripped, whitespace
    runs collapsed to one space (sacreBLEU's reading of these files)."""
    sentences = []
    for raw in raw_lines(path):
        line = raw.decode("utf-8", errors="replace")
        if line.startswith("<seg "):
            sentences.append(re.sub(r"\s+", " ", _SEG.sub(r"\1", line).strip()))
    if not sentences:
        raise PrepareError(f"{path} holds no <seg> lines: not a WMT test set")
    return sentences


def _as_text(sgm: Path, folder: Path) -> Path:
    """The sentences of an SGML file as a text file in `folder` (rewritten only if changed)."""
    name = sgm.name.removesuffix(".gz").removesuffix(".sgm")
    path = folder / name
    text = "".join(s + "\n" for s in sgm_text(sgm))
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
    return path


# --------------------------------------------------------------------------- prepare


def find_corpus(
    pair: str,
    source: Path | None,
    cache: Path,
    url_base: str = URL_BASE,
    archives: dict[str, Archive] | None = None,
    progress: bool = True,
) -> dict[str, list[FilePair]]:
    """The file pairs of every split of `pair` (see the module docstring), fetched if needed."""
    if pair not in PAIRS:
        raise PrepareError(f"--pair must be one of {PAIRS}, got {pair!r}")
    if source is not None and not Path(source).is_dir():
        raise PrepareError(f"--source {source} is not a folder")
    fetcher = Fetcher(source, cache, url_base, archives or ARCHIVES, progress)
    members = MEMBERS[pair]
    needed: dict[str, set[str]] = {}
    for m in members:
        needed.setdefault(m.archive, set()).update((m.en, m.other))
    corpus: dict[str, list[FilePair]] = {split: [] for split in SPLITS}
    for m in members:
        en, other = (fetcher.member(m.archive, name, needed[m.archive]) for name in (m.en, m.other))
        if m.split == "test":
            folder = Path(cache) / "wmt14-newstest2014"
            en, other = _as_text(en, folder), _as_text(other, folder)
        corpus[m.split].append(FilePair(en, other))
    return corpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.wmt14",
        description="Prepare WMT'14 En-De or En-Fr (the paper's §5.3): the official training"
        " corpora, newstest2012+2013 for validation, the full newstest2014 for test, from"
        " statmt.org archives (downloaded into --cache, resumably and verified) or a local copy"
        " (--source), binarized by data_prep.parallel into OUT/wmt14-en-<xx>-<recipe_id>/, whose"
        " path is the last line on stdout. A complete folder of the same recipe is reused."
        " Exit status 2 with one 'error: ...' line on bad input, 1 when a download fails (or"
        " there is no network: then the message says how to give a local copy).",
        epilog="Example: python -m data_prep.wmt14 --out data --pair en-de --source ~/wmt14"
        " (a folder holding the archives, or the trees they extract to).",
    )
    parser.add_argument("--out", type=Path, required=True, help="parent folder of the dataset")
    parser.add_argument("--pair", choices=PAIRS, default="en-de", help="default en-de")
    parser.add_argument(
        "--source",
        type=Path,
        default=None,
        help="a local copy in the official layout: the archives, or the trees they extract to"
        " (training/europarl-v7.de-en.en, commoncrawl.de-en.en, dev/newstest2012.en,"
        " test-full/newstest2014-deen-src.en.sgm, ...); nothing is downloaded",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("data/downloads"),
        help="where archives are downloaded and extracted, and their hashes recorded (default"
        " data/downloads)",
    )
    parser.add_argument(
        "--url-base", default=URL_BASE, help=f"where the archives are (default {URL_BASE})"
    )
    parser.add_argument("--name", default="wmt14", help="dataset name (default wmt14)")
    add_config_arguments(parser)
    return parser


def prepare_wmt14(
    out: Path,
    pair: str,
    config: ParallelConfig,
    *,
    source: Path | None = None,
    cache: Path = Path("data/downloads"),
    url_base: str = URL_BASE,
    archives: dict[str, Archive] | None = None,
    workers: int = 1,
    progress: bool = True,
) -> Path:
    """Fetch the pair's files (find_corpus) and build `out/<name>-en-<xx>-<recipe_id>/`."""
    if workers < 1:
        raise PrepareError(f"--workers must be >= 1, got {workers}")
    corpus = find_corpus(pair, source, cache, url_base, archives, progress)
    return prepare_parallel(config, corpus, out, workers=workers, progress=progress)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args, args.name, *args.pair.split("-"))
        folder = prepare_wmt14(
            args.out,
            args.pair,
            config,
            source=args.source,
            cache=args.cache,
            url_base=args.url_base,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (PrepareError, VocabularyError, ValueError, *PATH_ERRORS) as error:  # bad input
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (DownloadError, OSError) as error:  # a download failed, or the disk did
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
