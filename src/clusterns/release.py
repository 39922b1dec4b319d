"""Release stage: a finished run's model as a folder ready for the Hub, and the optional upload.

``python -m clusterns.release build --run-dir RUN --output RUN/release [--sts F] [--transfer F]
[--clustering F]``: ``release/`` = every file of ``RUN/model`` but hidden bookkeeping files
(hard links, so no second copy of the weights; a copy where links cannot be made) plus a ``README.md`` model card with the run's
settings and its evaluation results.

``python -m clusterns.release push --folder RUN/release --repo-id USER/NAME [--private]``
uploads it with ``huggingface_hub`` (token from ``HF_TOKEN``, or the login of ``hf auth login``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from clusterns.model.card import model_card
from clusterns.utils.files import atomic_path

__all__ = ["build_release", "push", "main"]


def _read(path: str | Path | None) -> dict | None:
    if path is None:
        return None
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} not found; run its evaluation first") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def build_release(run_dir: str | Path, output: str | Path, *, sts: str | Path | None = None,
                  transfer: str | Path | None = None, clustering: str | Path | None = None) -> Path:
    """Write ``output`` (atomically): the run's model files plus the model card."""
    run_dir, output = Path(run_dir), Path(output)
    model, summary_path = run_dir / "model", run_dir / "run.json"
    if not model.is_dir() or not summary_path.is_file():
        raise ValueError(f"{run_dir} is not a finished run (model/ and run.json missing); train it first")
    summary = _read(summary_path)
    card = model_card(summary, _read(sts), _read(transfer), _read(clustering))
    with atomic_path(output) as tmp:
        tmp.mkdir(parents=True)
        for src in sorted(model.rglob("*")):
            rel = src.relative_to(model)
            if any(part.startswith(".") for part in rel.parts):
                # bookkeeping such as Snakemake's .snakemake_timestamp: never published, and never
                # linked (touching the link would touch the model and rerun every evaluation)
                continue
            dst = tmp / rel
            if src.is_dir():
                dst.mkdir(parents=True, exist_ok=True)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.name == "README.md":
                continue  # replaced by the card with the results
            try:
                os.link(src, dst)
            except OSError:  # another file system, or links not allowed
                shutil.copy2(src, dst)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return output


def push(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
         api=None) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; returns the commit URL."""
    folder = Path(folder)
    if not (folder / "README.md").is_file() or not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a release folder (README.md and config.json missing); build it first")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token or os.environ.get("HF_TOKEN"))
    api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                             commit_message="Upload a model trained with the clusterns pipeline")
    return str(getattr(info, "commit_url", info))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clusterns.release", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="the release folder of a finished run (model files + model card)")
    b.add_argument("--run-dir", required=True)
    b.add_argument("--output", required=True)
    b.add_argument("--sts", default=None, help="the run's sts_test.json")
    b.add_argument("--transfer", default=None, help="the run's transfer.json")
    b.add_argument("--clustering", default=None, help="the run's clustering.json")
    u = sub.add_parser("push", help="upload a release folder to the Hugging Face Hub")
    u.add_argument("--folder", required=True)
    u.add_argument("--repo-id", required=True)
    u.add_argument("--private", action="store_true")
    u.add_argument("--record", default=None, help="write what was uploaded (repo id, commit URL) to this JSON file")
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            out = build_release(args.run_dir, args.output, sts=args.sts, transfer=args.transfer,
                                clustering=args.clustering)
            print(f"wrote {out} (model files and README.md)")
        else:
            try:
                url = push(args.folder, args.repo_id, private=args.private)
            except (ValueError, OSError):
                raise
            except Exception as e:  # the Hub's HTTP errors (no token, no permission, offline)
                raise OSError(f"upload to {args.repo_id} failed ({type(e).__name__}: {e}); set HF_TOKEN to a "
                              "token with write access and check the repo id") from None
            if args.record:
                from clusterns.utils.files import write_json_atomic

                write_json_atomic(args.record, {"repo_id": args.repo_id, "commit_url": url, "private": args.private,
                                                "folder": str(Path(args.folder).resolve())})
            print(f"uploaded {args.folder} to {args.repo_id}: {url}")
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
