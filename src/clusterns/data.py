"""Inputs of the pipeline: verified, resumable, atomic downloads; SentEval unpacking; backbones.

Every download can come from a mirror (config key ``mirror``, or ``CLUSTERNS_MIRROR``, which
wins): a local folder or an http(s) base URL holding the files under their upstream basenames.
An output path only ever appears once its content is complete and verified.

CLI (called by the Snakemake rules)::

    python -m clusterns.data fetch --url URL --output PATH [--mirror M] [--sha256 HEX]
                                   [--size N] [--lines N] [--head N] [--retries N]
    python -m clusterns.data unpack --archive TAR --output DIR [--expect REL ...]
    python -m clusterns.data backbone --model ID --output DIR [--revision REV]
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import http.client
import importlib
import os
import re
import shutil
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Iterable, Sequence
from urllib.parse import quote, unquote, urlparse

from clusterns.utils.files import atomic_path, sha256_file, write_json_atomic

MIRROR_ENV = "CLUSTERNS_MIRROR"
_CHUNK = 1 << 20
_USER_AGENT = "clusterns-data/0.1 (python urllib)"

_MIRROR_HINT = (f"set the environment variable {MIRROR_ENV} or the config key `mirror` to a folder "
                "(or http(s) base URL) holding the file under its upstream name, or check the URL")


class DataError(RuntimeError):
    """A problem with inputs that the user can fix (missing, truncated or corrupt data, bad ids)."""


# --------------------------------------------------------------------------- sources and mirrors

def _is_http(location: str) -> bool:
    return location.lower().startswith(("http://", "https://"))


def _file_url_path(location: str) -> Path:
    """Local path of a ``file://`` URL or of a plain path."""
    if location.lower().startswith("file://"):
        return Path(unquote(urlparse(location).path))
    return Path(location).expanduser()


def upstream_basename(url: str) -> str:
    """Basename of the URL path: the name a mirror stores the file under."""
    name = PurePosixPath(unquote(urlparse(url).path)).name
    if not name:
        raise DataError(f"cannot tell the file name of {url!r} (its path ends with '/')")
    return name


def resolve_source(url: str, mirror: str | os.PathLike | None = None) -> str:
    """Where to read ``url`` from: ``$CLUSTERNS_MIRROR``, else ``mirror``, else the URL itself.

    A mirror is a local folder or an http(s) base URL holding the file under its upstream
    basename. A local mirror that lacks the file is an error naming the path to fill.
    """
    env = os.environ.get(MIRROR_ENV, "").strip()
    if env:
        chosen, origin = env, f"environment variable {MIRROR_ENV}"
    elif mirror not in (None, ""):
        chosen, origin = str(mirror), "mirror setting (config key `mirror`)"
    else:
        return url
    name = upstream_basename(url)
    if _is_http(chosen):
        return chosen.rstrip("/") + "/" + quote(name)
    folder = _file_url_path(chosen)
    if not folder.is_dir():
        raise DataError(f"mirror {chosen!r} (from the {origin}) is neither an existing folder nor an "
                        f"http(s) URL; fix or unset it to download {url}")
    path = folder / name
    if not path.is_file():
        raise DataError(f"{name} is missing from the mirror: {path} does not exist (mirror {chosen!r} "
                        f"from the {origin}); put the file there, point the mirror elsewhere, or unset "
                        f"it to download {url}")
    return str(path.resolve())


# --------------------------------------------------------------------------- transfer

class _Incomplete(Exception):
    """A transfer that ended early; retried (and resumed) by ``_download_http``."""


def _missing_message(url: str) -> str:
    return f"not found: {url} (HTTP 404); {_MIRROR_HINT}"


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from a ``Content-Range`` header; None where absent or '*'."""
    m = re.match(r"\s*bytes\s+(\d+|\*)(?:-\d+)?/(\d+|\*)", value or "")
    if not m:
        return None, None
    start = None if m.group(1) == "*" else int(m.group(1))
    total = None if m.group(2) == "*" else int(m.group(2))
    return start, total


def _http_attempt(url: str, part: Path, timeout: float) -> None:
    """One GET of ``url`` into ``part``, resuming with ``Range`` when ``part`` already has bytes."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        with e:
            if e.code == 416 and have:
                _, total = _parse_content_range(e.headers.get("Content-Range"))
                if total == have:
                    return  # the part file already holds the whole file
                part.unlink(missing_ok=True)
                raise _Incomplete(f"server refused to resume at byte {have}; restarting") from None
            if e.code in (404, 410):
                part.unlink(missing_ok=True)
                raise DataError(_missing_message(url)) from None
            if e.code in (408, 425, 429) or e.code >= 500:
                raise _Incomplete(f"HTTP {e.code} {e.reason}") from None
            raise DataError(f"download of {url} refused: HTTP {e.code} {e.reason}; {_MIRROR_HINT}") from None
    with response:
        if response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != have:
                part.unlink(missing_ok=True)
                raise _Incomplete(f"server resumed at byte {start}, not {have}; restarting")
            mode = "ab"
        else:  # 200: the server ignored Range (or there was none); start from zero
            mode, have = "wb", 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        with open(part, mode) as f:
            while True:
                block = response.read(_CHUNK)
                if not block:
                    break
                f.write(block)
    got = part.stat().st_size
    if total is not None and got != total:
        raise _Incomplete(f"connection closed after {got} of {total} bytes")


def _download_http(url: str, part: Path, *, retries: int, timeout: float, backoff: float) -> None:
    """Download ``url`` into ``part`` with retries (exponential backoff) and resume."""
    attempt = 0
    while True:
        try:
            _http_attempt(url, part, timeout)
            return
        except (_Incomplete, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            attempt += 1
            reason = getattr(e, "reason", None) or e
            if attempt > retries:
                kept = f"; {part} keeps the bytes received and the next run resumes" if part.exists() else ""
                raise DataError(f"could not download {url} after {attempt} attempts (last error: {reason}){kept}; "
                                f"check the network or {_MIRROR_HINT}") from None
            time.sleep(backoff * 2 ** (attempt - 1))


def _copy_local(source: Path, part: Path) -> None:
    """Chunked copy of a local source into ``part`` (always from zero)."""
    if not source.is_file():
        raise DataError(f"source file {source} does not exist; {_MIRROR_HINT}")
    try:
        with open(source, "rb") as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise DataError(f"could not copy {source}: {e}") from None


# --------------------------------------------------------------------------- verification

def count_lines(path: str | Path) -> int:
    """Number of lines in a file (a last line without a trailing newline counts)."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")


def _write_head(source: Path, target: Path, head: int) -> int:
    """Copy the first ``head`` lines of ``source`` to ``target``; return how many were copied."""
    n = 0
    with open(source, "rb") as src, open(target, "wb") as dst:
        for line in src:
            if n == head:
                break
            dst.write(line)
            n += 1
    return n


def _fail_verification(part: Path, message: str) -> DataError:
    part.unlink(missing_ok=True)  # bad bytes must not be resumed
    return DataError(message)


def fetch(url: str, output: str | Path, *, mirror: str | os.PathLike | None = None, sha256: str | None = None,
          size: int | None = None, lines: int | None = None, head: int | None = None, retries: int = 5,
          timeout: float = 60, backoff: float = 1.0) -> dict:
    """Download (or copy) ``url`` via the mirror into ``output``, verified, with a ``<output>.json`` sidecar.

    ``size``/``sha256`` check the source file; ``head`` keeps its first N lines (refusing fewer);
    ``lines`` then checks the exact line count of the result. ``output`` appears last, only when
    everything passed; an interrupted HTTP transfer leaves ``<output>.part`` to resume from.
    Returns the provenance record written to the sidecar.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    part = output.with_name(output.name + ".part")
    sidecar = output.with_name(output.name + ".json")
    source = resolve_source(url, mirror)

    if _is_http(source):
        _download_http(source, part, retries=retries, timeout=timeout, backoff=backoff)
    else:
        _copy_local(_file_url_path(source), part)

    source_bytes = part.stat().st_size
    if size is not None and source_bytes != size:
        raise _fail_verification(part, f"size mismatch for {source}: got {source_bytes} bytes, expected {size} "
                                       "(truncated or different file); check the URL or mirror")
    source_sha = sha256_file(part)
    if sha256 is not None and source_sha != sha256.lower():
        raise _fail_verification(part, f"sha256 mismatch for {source}: got {source_sha}, expected {sha256.lower()} "
                                       "(corrupt or different file); check the URL or mirror")

    with atomic_path(output) as tmp:
        if head is not None:
            got = _write_head(part, tmp, head)
            if got < head:
                tmp.unlink(missing_ok=True)
                raise _fail_verification(part, f"{source} has only {got} lines, fewer than head={head}; "
                                               "use a smaller head or a complete file")
        else:
            os.replace(part, tmp)
        n_lines = count_lines(tmp)
        if lines is not None and n_lines != lines:
            hint = ("; the mirror or URL probably serves a truncated copy (e.g. the developers' shared/mirror "
                    "holds only the first 11,914 lines of wiki1m_for_simcse.txt: enough for the demo, not for "
                    "full runs); point the mirror or URL at the complete file") if n_lines < lines else ""
            raise _fail_verification(part, f"{source} has {n_lines} lines, expected exactly {lines}{hint}")
        record = {
            "url": url,
            "source": source,
            "mirror": os.environ.get(MIRROR_ENV) or (str(mirror) if mirror else None),
            "sha256": sha256_file(tmp) if head is not None else source_sha,
            "bytes": tmp.stat().st_size,
            "lines": n_lines,
            "head": head,
            "source_sha256": source_sha,
            "source_bytes": source_bytes,
        }
        # Any earlier output goes first, so an old file never sits next to a new sidecar;
        # the output itself is renamed last (when the block exits): its presence means "complete".
        output.unlink(missing_ok=True)
        write_json_atomic(sidecar, record)
    part.unlink(missing_ok=True)
    return record


# --------------------------------------------------------------------------- SentEval archive

_STS_SUBSETS = {
    "STS12-en-test": ("MSRpar", "MSRvid", "SMTeuroparl", "surprise.OnWN", "surprise.SMTnews"),
    "STS13-en-test": ("FNWN", "headlines", "OnWN"),
    "STS14-en-test": ("deft-forum", "deft-news", "headlines", "images", "OnWN", "tweet-news"),
    "STS15-en-test": ("answers-forums", "answers-students", "belief", "headlines", "images"),
    "STS16-en-test": ("answer-answer", "headlines", "plagiarism", "postediting", "question-question"),
}

#: Files the STS evaluator reads from an unpacked ``senteval.tar`` (SentEval layout, relative paths).
SENTEVAL_REQUIRED: tuple[str, ...] = tuple(
    f"STS/{folder}/STS.{kind}.{subset}.txt"
    for folder, subsets in _STS_SUBSETS.items() for subset in subsets for kind in ("input", "gs")
) + (
    "STS/STSBenchmark/sts-train.csv",
    "STS/STSBenchmark/sts-dev.csv",
    "STS/STSBenchmark/sts-test.csv",
    "SICK/SICK_train.txt",
    "SICK/SICK_trial.txt",
    "SICK/SICK_test_annotated.txt",
)

# Single top-level folders that are stripped even when nothing is expected.
_KNOWN_WRAPPERS = {"senteval", "SentEval", "downstream", "data"}


def _member_parts(name: str) -> tuple[str, ...]:
    """Path components of a tar member name, without ``.`` and empty parts."""
    return tuple(p for p in name.replace("\\", "/").split("/") if p not in ("", "."))


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Refuse absolute paths, ``..``, links leaving the tree, and device files."""
    name = member.name.replace("\\", "/")
    bad = name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in _member_parts(name)
    if member.islnk():  # hard links name another member; symlinks are judged by tarfile's data filter
        link = member.linkname.replace("\\", "/")
        bad = bad or link.startswith("/") or ".." in _member_parts(link)
    if member.isdev() or (member.issym() and not hasattr(tarfile, "data_filter")):
        bad = True
    if bad:
        raise DataError(f"refusing to unpack {archive}: unsafe member {member.name!r} "
                        "(absolute path, '..' or special file); the archive is corrupt or not the expected one")


def _wrapper_prefix(members: Sequence[tarfile.TarInfo], expect: Sequence[str]) -> tuple[str, ...]:
    """Leading folders to strip so that the archive's content lands directly in the output folder."""
    expected_tops = {_member_parts(e)[0] for e in expect if _member_parts(e)}
    names = [_member_parts(m.name) for m in members]
    names = [n for n in names if n]
    prefix: tuple[str, ...] = ()
    while True:
        rest = [n[len(prefix):] for n in names if len(n) > len(prefix)]
        tops = {n[0] for n in rest}
        if len(tops) != 1 or all(len(n) == 1 for n in rest):
            return prefix
        top = next(iter(tops))
        if top in expected_tops or not (expect or top in _KNOWN_WRAPPERS):
            return prefix
        prefix += (top,)


def unpack(archive: str | Path, output_dir: str | Path, *, expect: Iterable[str] = ()) -> Path:
    """Extract a tar safely into ``output_dir`` (atomically) and check the ``expect`` paths exist.

    A ``./`` prefix or a single wrapper folder (``senteval/``, ``downstream/``, ...) is dropped so
    that e.g. ``output_dir/STS/...`` exists whatever the archive's top level looked like.
    """
    archive, output_dir, expect = Path(archive), Path(output_dir), list(expect)
    if not archive.is_file():
        raise DataError(f"archive {archive} does not exist; run the fetch step first")
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member)
            prefix = _wrapper_prefix(members, expect)

            def rename(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
                parts = _member_parts(member.name)[len(prefix):]
                if not parts:
                    return None  # the wrapper folder itself
                member = copy.copy(member)
                member.name = "/".join(parts)
                if member.islnk():
                    member.linkname = "/".join(_member_parts(member.linkname)[len(prefix):])
                return tarfile.data_filter(member, dest) if hasattr(tarfile, "data_filter") else member

            with atomic_path(output_dir) as tmp:
                tmp.mkdir()
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmp, members=members, filter=rename)
                else:  # Python < 3.10.12: members were checked by _check_member above
                    kept = [m for m in (rename(m, str(tmp)) for m in members) if m is not None]
                    tar.extractall(tmp, members=kept)
                missing = [rel for rel in expect if not (tmp / rel).exists()]
                if missing:
                    shown = ", ".join(missing[:10]) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
                    raise DataError(f"{archive} lacks {len(missing)} expected file(s): {shown}; "
                                    "the archive is incomplete or not the SentEval data")
    except getattr(tarfile, "FilterError", ()) as e:
        raise DataError(f"refusing to unpack {archive}: {e}; the archive is corrupt or not the expected one") from None
    except (tarfile.TarError, EOFError) as e:
        raise DataError(f"cannot unpack {archive}: {e} (truncated or corrupt download? delete it and fetch again)") from None
    return output_dir


# --------------------------------------------------------------------------- backbones

BACKBONE_PATTERNS: tuple[str, ...] = (
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "vocab.json", "merges.txt", "added_tokens.json", "*.safetensors", "*.json", "*.txt",
)
_BIN_WEIGHTS = "pytorch_model.bin"
SOURCE_RECORD = ".clusterns_source.json"
_HUB_HINT = ("the Hugging Face hub is unreachable or the model is not cached; run this step on a machine with "
             "internet access (the files are cached under HF_HOME), set HF_ENDPOINT to a hub mirror, or point the "
             "backbone's `model` in the config at a local folder (or package:<module>)")


def _package_model_path(module: str) -> Path:
    """Model folder shipped by an installed Python package exposing ``get_model_path()``."""
    pip_name = module.replace("_", "-")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        raise DataError(f"backbone package:{module} needs the Python package {module!r}; "
                        f"install it with `pip install {pip_name}`") from None
    getter = getattr(mod, "get_model_path", None)
    if not callable(getter):
        raise DataError(f"module {module!r} has no get_model_path(); package:<module> needs one "
                        f"(is `{pip_name}` the right package?)")
    return _check_model_dir(Path(getter()), f"package:{module}")


def _check_model_dir(path: Path, what: str) -> Path:
    if not (path / "config.json").is_file():
        raise DataError(f"backbone {what}: {path} is not a model folder (no config.json)")
    return path


def _looks_like_path(model_id: str) -> bool:
    return model_id.startswith(("/", "./", "../", "~", "file://")) or model_id.count("/") > 1 or "\\" in model_id


def resolve_local_backbone(model_id: str) -> Path | None:
    """Folder of a local-folder or ``package:<module>`` backbone; None for a hub id (needs a download)."""
    if model_id.startswith("package:"):
        return _package_model_path(model_id[len("package:"):].strip())
    path = _file_url_path(model_id)
    if path.is_dir():
        return _check_model_dir(path, model_id)
    if _looks_like_path(model_id):
        raise DataError(f"backbone folder {path} does not exist (from model {model_id!r})")
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cache_dir() -> str | None:
    """The hub cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub), else the library default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    return None


def _snapshot(model_id: str, revision: str | None, patterns: Sequence[str]) -> Path:
    """Cache ``patterns`` of a hub repo (honouring HF_ENDPOINT / HF_HUB_OFFLINE); return its snapshot folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    try:
        return Path(snapshot_download(
            model_id, revision=revision, cache_dir=_hub_cache_dir(), allow_patterns=list(patterns),
            local_files_only=_env_flag("HF_HUB_OFFLINE"), endpoint=os.environ.get("HF_ENDPOINT") or None,
        ))
    except hf_errors.HFValidationError as e:
        raise DataError(f"backbone {model_id!r} is neither a local folder, package:<module>, nor a valid hub id: {e}") from None
    except hf_errors.RevisionNotFoundError:
        raise DataError(f"revision {revision!r} of {model_id} not found on the hub; fix `revision` in the config") from None
    except (hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError):
        raise DataError(f"model {model_id!r} not found on the hub (or access is denied); check the backbone's `model`") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.HfHubHTTPError, OSError) as e:
        offline = " (HF_HUB_OFFLINE is set)" if _env_flag("HF_HUB_OFFLINE") else ""
        raise DataError(f"cannot get {model_id}{offline}: {_HUB_HINT}. Details: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    except Exception as e:  # network stacks (httpx/requests) raise their own connection errors
        if "connect" in type(e).__name__.lower() or "timeout" in type(e).__name__.lower():
            raise DataError(f"cannot get {model_id}: {_HUB_HINT}. Details: {e}") from None
        raise


def _selected_files(snapshot: Path, patterns: Sequence[str]) -> list[Path]:
    return sorted(p.relative_to(snapshot) for p in snapshot.rglob("*")
                  if p.is_file() and any(fnmatch.fnmatch(str(p.relative_to(snapshot)), pat) for pat in patterns))


def fetch_backbone(model_id: str, output_dir: str | Path, *, revision: str | None = None) -> Path:
    """Model folder for ``model_id``: a local or packaged folder as is, a hub model copied into ``output_dir``.

    Hub files (config, tokenizer, safetensors weights; ``pytorch_model.bin`` only when a repo has
    no safetensors) go through the hub cache, so HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE apply
    and a cached model works offline. ``output_dir`` appears atomically, with a
    ``.clusterns_source.json`` recording id, revision and the resolved commit.
    """
    local = resolve_local_backbone(model_id)
    if local is not None:
        return local
    patterns = list(BACKBONE_PATTERNS)
    snapshot = _snapshot(model_id, revision, patterns)
    if not any(f.suffix == ".safetensors" for f in _selected_files(snapshot, patterns)):
        patterns.append(_BIN_WEIGHTS)
        snapshot = _snapshot(model_id, revision, patterns)
    files = _selected_files(snapshot, patterns)
    if not any(f.suffix == ".safetensors" or f.name == _BIN_WEIGHTS for f in files):
        raise DataError(f"{model_id} has no *.safetensors or {_BIN_WEIGHTS} weights at revision {revision or 'main'}")
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    output_dir = Path(output_dir)
    with atomic_path(output_dir) as tmp:
        for rel in files:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snapshot / rel, tmp / rel)  # follows the cache's symlinks to the blobs
        _check_model_dir(tmp, model_id)
        write_json_atomic(tmp / SOURCE_RECORD, {
            "model": model_id, "revision": revision, "commit": commit,
            "endpoint": os.environ.get("HF_ENDPOINT") or None,
            "files": {str(rel): (tmp / rel).stat().st_size for rel in files},
        })
    return output_dir


# --------------------------------------------------------------------------- CLI

def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m clusterns.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="download (or copy from the mirror) one file, verified and atomic")
    p.add_argument("--url", required=True, help="upstream URL (http(s):// or file://)")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--mirror", default=None, help=f"folder or base URL holding the file ({MIRROR_ENV} wins)")
    p.add_argument("--sha256", default=None, help="expected sha256 of the source file")
    p.add_argument("--size", type=int, default=None, help="expected size of the source file in bytes")
    p.add_argument("--lines", type=int, default=None, help="exact number of lines the output must have")
    p.add_argument("--head", type=int, default=None, help="keep only the first N lines")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per network read")

    p = sub.add_parser("unpack", help="extract a tar atomically and check expected files")
    p.add_argument("--archive", required=True, type=Path)
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--expect", nargs="*", default=None,
                   help="relative paths that must exist afterwards (default: the SentEval STS files)")

    p = sub.add_parser("backbone", help="download a hub model (or check a local / package: folder)")
    p.add_argument("--model", required=True, help="hub id, local folder, or package:<module>")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--revision", default=None)
    return parser


def _run(args: argparse.Namespace) -> str:
    if args.command == "fetch":
        rec = fetch(args.url, args.output, mirror=args.mirror, sha256=args.sha256, size=args.size,
                    lines=args.lines, head=args.head, retries=args.retries, timeout=args.timeout)
        return (f"fetched {args.output} from {rec['source']}: {rec['bytes']} bytes, {rec['lines']} lines, "
                f"sha256 {rec['sha256']}")
    if args.command == "unpack":
        expect = SENTEVAL_REQUIRED if args.expect is None else args.expect
        out = unpack(args.archive, args.output, expect=expect)
        return f"unpacked {args.archive} into {out} ({len(expect)} expected files present)"
    folder = fetch_backbone(args.model, args.output, revision=args.revision)
    return f"backbone {args.model} ready at {folder}"


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; user errors print ``error: ...`` and exit with status 1."""
    args = _build_parser().parse_args(argv)
    try:
        message = _run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    print(message, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
