"""Checksums, verification and upload of ``dataset/``.

``MANIFEST.sha256`` lists one ``sha256  relative/path`` line per published file (the format
``sha256sum -c`` reads). The merge ledger's own files (``webdataset/*_stats.json`` and
``webdataset/_ledger/``: config and failure records) and temporaries are bookkeeping, not
data: they are neither listed nor uploaded.

A manifest entry names a file inside ``dataset/`` and nothing else: an entry that is absolute,
has a ``..`` component or resolves (through symlinks) outside the folder is a problem for
``verify_dataset``, which does not read it, and ``publish_dataset`` refuses it before anything
is uploaded (:func:`unsafe_entry`).

What is published: by default the metadata only: ``parquet/`` (URLs, alt-texts, synthetic
captions, scores), the card, ``stats.json``, the report and the manifest. The images
(``webdataset/*.tar``, copies of third-party images, terabytes for LAION-aesthetics) are
uploaded only with ``include_images=True`` (``recaption publish --with-images``). Parquet files
that embed the images (``merge.embed_images_in_parquet``) are images too: a metadata-only
publish refuses them. The uploaded ``MANIFEST.sha256`` still lists every file of
``dataset/``; the card says to check a metadata-only copy with ``sha256sum -c
--ignore-missing``.

``publish_dataset`` uploads with huggingface_hub's ``upload_large_folder`` (resumable, many
files, commits in chunks); from huggingface_hub 2 on, that function is gone and
``upload_folder`` does the same (batched commits, resumes when rerun), so that is used there.
The token comes from ``HF_TOKEN`` or ``hf auth login`` and is never printed or logged.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import logging
from pathlib import Path, PurePosixPath, PureWindowsPath

from recaption.config import ConfigError, RunConfig
from recaption.ledger import LEDGER_DIR, STATS_SUFFIX, TMP_TAG, atomic_path

logger = logging.getLogger(__name__)

MANIFEST = "MANIFEST.sha256"
# The images: uploaded only when asked for (include_images / --with-images).
IMAGE_PATTERNS = ("webdataset/*",)
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


def unsafe_entry(dataset_dir: Path, rel: str) -> str | None:
    """Why the manifest path ``rel`` must not be read or uploaded, or ``None`` when it is safe.

    Safe: a relative path without ``..`` that stays inside ``dataset_dir`` once every symlink
    is resolved.
    """
    if not rel:
        return "is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return "contains control characters"
    if (
        rel.startswith(("/", "\\"))
        or PurePosixPath(rel).is_absolute()
        or PureWindowsPath(rel).is_absolute()
        or PureWindowsPath(rel).drive
    ):
        return "is an absolute path"
    if ".." in rel.replace("\\", "/").split("/"):
        return "contains '..'"
    root = dataset_dir.resolve()
    try:
        target = (dataset_dir / rel).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        return f"cannot be resolved ({exc})"
    if not target.is_relative_to(root):
        return f"resolves outside {root} (to {target})"
    return None


def _unsafe_entries(dataset_dir: Path, entries: list[str]) -> list[str]:
    """One problem per entry that :func:`unsafe_entry` refuses, naming the entry."""
    problems = []
    for rel in entries:
        why = unsafe_entry(dataset_dir, rel)
        if why is not None:
            problems.append(
                f"{dataset_dir / MANIFEST}: entry {rel!r} {why}; a manifest may only list "
                f"files inside {dataset_dir} (the manifest was edited or tampered with: "
                "rerun `recaption merge` to rewrite it)"
            )
    return problems


def verify_dataset(config: RunConfig) -> list[str]:
    """Problems found checking ``dataset/`` against its manifest (empty when all match).

    Names each file that is missing, changed (with both checksums) or not in the manifest,
    and each manifest entry that points outside ``dataset/`` (which is not read).
    """
    dataset_dir = config.dataset_dir
    manifest = dataset_dir / MANIFEST
    if not manifest.exists():
        return [f"{manifest} not found: run `recaption merge` to finish the dataset first"]
    outside = unsafe_entry(dataset_dir, MANIFEST)
    if outside is not None:
        return [f"{manifest} {outside}: not reading it"]
    try:
        entries = read_manifest(manifest)
    except (ValueError, UnicodeDecodeError) as exc:
        return [f"{manifest}: {exc}"]
    problems = []
    for rel, expected in entries.items():
        unsafe = _unsafe_entries(dataset_dir, [rel])
        if unsafe:
            problems += unsafe
            continue
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


def _check_repo_id(repo_id: str) -> None:
    """Raise ``ConfigError`` unless ``repo_id`` is ``ORG/NAME``."""
    if "/" not in repo_id or repo_id.count("/") != 1:
        raise ConfigError(
            f"--repo-id {repo_id!r}: expected ORG/NAME, e.g. my-org/laion-recaptioned"
        )


def _refuse_entries_outside(dataset_dir: Path) -> None:
    """Raise when the manifest, or an entry of it, is outside ``dataset_dir`` (by name)."""
    unsafe = _unsafe_entries(dataset_dir, [MANIFEST])
    # No manifest, or not one: verify_dataset names the problem.
    with contextlib.suppress(OSError, ValueError):
        if not unsafe:
            unsafe = _unsafe_entries(dataset_dir, list(read_manifest(dataset_dir / MANIFEST)))
    if unsafe:
        raise RuntimeError(
            "the manifest lists files outside the dataset; not publishing:\n  "
            + "\n  ".join(unsafe)
        )


def _refuse_unverified(config: RunConfig) -> None:
    """Raise when ``dataset/`` does not match its manifest, listing every problem."""
    problems = verify_dataset(config)
    if problems:
        raise RuntimeError(
            "the dataset does not match its manifest; not publishing:\n  " + "\n  ".join(problems)
        )


def _files_to_upload(dataset_dir: Path) -> list[str]:
    """The manifest and every file it checks; raise when one of them may not be uploaded."""
    files = [MANIFEST, *dataset_files(dataset_dir)]
    # What is uploaded is exactly what was verified, and every name is also a literal pattern
    # for allow_patterns (fnmatch): a name with a wildcard could select other files.
    unsafe = _unsafe_entries(dataset_dir, files)
    unsafe += [
        f"{rel!r}: a file name with * ? or [ is not uploaded"
        for rel in files
        if set(rel) & set("*?[")
    ]
    if unsafe:
        raise RuntimeError("refusing to publish:\n  " + "\n  ".join(unsafe))
    return files


def is_image_file(rel: str) -> bool:
    """True for a path under ``dataset/`` that holds images (``webdataset/*.tar``)."""
    return any(fnmatch.fnmatch(rel, pattern) for pattern in IMAGE_PATTERNS)


def select_files(config: RunConfig, files: list[str], *, include_images: bool) -> list[str]:
    """The files to upload: ``files`` without the images unless ``include_images``.

    Raises ``RuntimeError`` when a metadata-only publish would still carry images (parquet
    files with the image bytes, ``merge.embed_images_in_parquet``).
    """
    if include_images:
        return files
    if config.merge.embed_images_in_parquet:
        raise RuntimeError(
            f"{config.dataset_dir / 'parquet'}: the parquet files embed the images "
            f"(merge.embed_images_in_parquet: true in {config.source}), so publishing the "
            "metadata would re-host the images too. Publish with --with-images if you may "
            "redistribute them (see docs/GUIDE.md, 'Publish'), or set "
            "merge.embed_images_in_parquet: false and rerun `recaption merge --overwrite`"
        )
    return [rel for rel in files if not is_image_file(rel)]


def _log_dry_run(
    dataset_dir: Path,
    repo_id: str,
    files: list[str],
    total: int,
    *,
    private: bool,
    left_out: list[str],
) -> None:
    """Log what an upload would send (each file with its size) and the dataset card."""
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
    if left_out:
        logger.info(
            "not uploaded: %d image file(s), %.1f GB (webdataset/); add --with-images to "
            "publish the images as well:",
            len(left_out),
            sum((dataset_dir / rel).stat().st_size for rel in left_out) / 1e9,
        )
        for rel in left_out:
            logger.info("  (not uploaded) %10d  %s", (dataset_dir / rel).stat().st_size, rel)
    card = dataset_dir / "README.md"
    logger.info("dataset card (%s):\n%s", card, card.read_text(encoding="utf-8"))


def _upload(dataset_dir: Path, repo_id: str, files: list[str], *, private: bool) -> None:
    """Create the Hub dataset repo if needed and upload ``files``; ``RuntimeError`` on failure."""
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
            "Check the network, `hf auth login` (or HF_TOKEN) and write access, then "
            "rerun: the upload resumes where it stopped"
        ) from exc


def publish_dataset(
    config: RunConfig,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: bool = False,
    include_images: bool = False,
) -> None:
    """Upload ``dataset/`` to the Hub dataset repo ``repo_id`` (after verifying it).

    The metadata only unless ``include_images`` (see the module docstring). ``dry_run`` logs
    the file list (with sizes), what is left out and the dataset card instead of uploading.
    Raises ``RuntimeError`` when the dataset does not verify, when a metadata-only publish
    would carry images, or when the upload fails.
    """
    _check_repo_id(repo_id)
    dataset_dir = config.dataset_dir
    # Manifest entries outside the dataset are refused first, by name, before anything else.
    _refuse_entries_outside(dataset_dir)
    _refuse_unverified(config)
    verified = _files_to_upload(dataset_dir)
    files = select_files(config, verified, include_images=include_images)
    left_out = [rel for rel in verified if rel not in set(files)]
    total = sum((dataset_dir / f).stat().st_size for f in files)
    if dry_run:
        _log_dry_run(dataset_dir, repo_id, files, total, private=private, left_out=left_out)
        return
    _upload(dataset_dir, repo_id, files, private=private)
    logger.info(
        "published %d file(s) to https://huggingface.co/datasets/%s (%s)",
        len(files),
        repo_id,
        "metadata and images" if include_images else "metadata only, no images",
    )
