"""Checksums, verification and upload of ``dataset/``.

``MANIFEST.sha256`` lists one ``sha256  relative/path`` line per published file (the format
``sha256sum -c`` reads). The merge ledger's own files (``webdataset/*_stats.json`` and
``webdataset/_ledger/``: config and failure records) and temporaries are bookkeeping, not
data: they are neither listed nor uploaded.

``publish_dataset`` uploads with huggingface_hub's ``upload_large_folder`` (resumable, many
files, commits in chunks); from huggingface_hub 2 on, that function is gone and
``upload_folder`` does the same (batched commits, resumes when rerun), so that is used there.
The token comes from ``HF_TOKEN`` or ``huggingface-cli login`` and is never printed or logged.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
from pathlib import Path

from recaption.config import RunConfig
from recaption.ledger import LEDGER_DIR, STATS_SUFFIX, TMP_TAG, atomic_path

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.sha256"
# Paths under dataset/ that are bookkeeping, not data (relative, fnmatch patterns).
IGNORED = (
    f"webdataset/*{STATS_SUFFIX}",
    f"webdataset/{LEDGER_DIR}/*",
    ".cache/*",
)


def dataset_files(dataset_dir: Path) -> list[str]:
    """Relative paths of every file to publish, sorted (manifest itself excluded)."""
    out = []
    for path in sorted(dataset_dir.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(dataset_dir).as_posix()
        if (
            rel == MANIFEST
            or TMP_TAG in path.name
            or any(p.startswith(".") for p in rel.split("/"))
        ):
            continue
        if any(fnmatch.fnmatch(rel, pattern) for pattern in IGNORED):
            continue
        out.append(rel)
    return out


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(dataset_dir: Path) -> Path:
    """Write ``MANIFEST.sha256`` for every published file; return its path."""
    lines = [f"{sha256_file(dataset_dir / rel)}  {rel}" for rel in dataset_files(dataset_dir)]
    path = dataset_dir / MANIFEST
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_manifest(path: Path) -> dict[str, str]:
    """relative path -> sha256 from a manifest file."""
    entries: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(f"{path}:{number}: not a 'sha256  path' line: {line[:80]!r}")
        entries[rel] = digest
    return entries


def verify_dataset(config: RunConfig) -> list[str]:
    """Problems found checking ``dataset/`` against its manifest (empty when all match).

    Names each file that is missing, changed (with both checksums) or not in the manifest.
    """
    dataset_dir = config.dataset_dir
    manifest = dataset_dir / MANIFEST
    if not manifest.exists():
        return [f"{manifest} not found: run `recaption merge` to finish the dataset first"]
    try:
        entries = read_manifest(manifest)
    except ValueError as exc:
        return [str(exc)]
    problems = []
    for rel, expected in entries.items():
        path = dataset_dir / rel
        if not path.is_file():
            problems.append(f"{path}: listed in {MANIFEST} but missing")
            continue
        actual = sha256_file(path)
        if actual != expected:
            problems.append(
                f"{path}: checksum mismatch (manifest {expected[:12]}..., file {actual[:12]}...); "
                "the file changed or is corrupt: rerun `recaption merge --overwrite` or restore it"
            )
    for rel in dataset_files(dataset_dir):
        if rel not in entries:
            problems.append(f"{dataset_dir / rel}: not listed in {MANIFEST}")
    return problems


def publish_dataset(
    config: RunConfig, repo_id: str, *, private: bool = False, dry_run: bool = False
) -> None:
    """Upload ``dataset/`` to the Hub dataset repo ``repo_id`` (after verifying it).

    ``dry_run`` logs the file list (with sizes) and the dataset card instead of uploading.
    Raises ``RuntimeError`` when the dataset does not verify or the upload fails.
    """
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise ValueError(f"--repo-id {repo_id!r}: expected ORG/NAME, e.g. my-org/laion-recaptioned")
    problems = verify_dataset(config)
    if problems:
        raise RuntimeError(
            "the dataset does not match its manifest; not publishing:\n  " + "\n  ".join(problems)
        )
    dataset_dir = config.dataset_dir
    files = [MANIFEST, *dataset_files(dataset_dir)]
    total = sum((dataset_dir / f).stat().st_size for f in files)
    if dry_run:
        logger.info(
            "dry run: would upload %d file(s), %.1f MB, from %s to the dataset repo %s%s:",
            len(files),
            total / 1e6,
            dataset_dir,
            repo_id,
            " (private)" if private else "",
        )
        for rel in files:
            logger.info("  %10d  %s", (dataset_dir / rel).stat().st_size, rel)
        card = dataset_dir / "README.md"
        logger.info("dataset card (%s):\n%s", card, card.read_text(encoding="utf-8"))
        return

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()  # token: HF_TOKEN or the saved login; never passed through our logs
    try:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        upload_large_folder = getattr(api, "upload_large_folder", None)
        if upload_large_folder is not None:  # huggingface_hub < 2
            upload_large_folder(
                repo_id=repo_id,
                folder_path=dataset_dir,
                repo_type="dataset",
                private=private,
                allow_patterns=files,
            )
        else:  # huggingface_hub >= 2: upload_folder itself commits in batches and resumes
            api.upload_folder(
                repo_id=repo_id,
                folder_path=dataset_dir,
                repo_type="dataset",
                allow_patterns=files,
                commit_message=f"Upload {len(files)} dataset files with recaption",
            )
    except (HfHubHTTPError, OSError, ValueError) as exc:
        # Messages from the hub library never include the token; keep only the first line.
        raise RuntimeError(
            f"upload of {dataset_dir} to {repo_id} failed: {str(exc).splitlines()[0]}. "
            "Check the network, `huggingface-cli login` (or HF_TOKEN) and write access, then "
            "rerun: the upload resumes where it stopped"
        ) from exc
    logger.info("published %d file(s) to https://huggingface.co/datasets/%s", len(files), repo_id)
