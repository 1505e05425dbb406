"""Hub dataset repos: a repo id (e.g. `lerobot/libero_10`) fetched with snapshot_download into the hub cache."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

__all__ = ["looks_like_repo_id", "download_dataset"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(name: str) -> bool:
    """`org/name` that is not an existing local path."""
    return bool(_REPO_ID.match(name)) and not Path(name).exists()


def download_dataset(repo_id: str, revision: Optional[str] = None) -> Path:
    """The local snapshot directory of a hub dataset repo (downloaded once, then read from the hub cache).

    huggingface_hub writes each file to a temporary name and renames it, under a file lock, so several ranks
    may call this at once; with accelerate's main_process_first the main process downloads and the others
    only read the cache.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision))
    except RepositoryNotFoundError as e:
        raise ValueError(
            f"dataset={repo_id!r}: the hub has no dataset repo of that name (or it is private/gated: log in with "
            "`hf auth login`); check the name, or pass a local directory"
        ) from e
    except RevisionNotFoundError as e:
        raise ValueError(f"dataset={repo_id!r} has no revision {revision!r} on the hub") from e
    except LocalEntryNotFoundError as e:
        offline = "HF_HUB_OFFLINE=1 forbids downloading it" if constants.HF_HUB_OFFLINE else "the hub is unreachable"
        raise FileNotFoundError(
            f"dataset={repo_id!r} is not in the local hub cache ({constants.HF_HUB_CACHE}) and {offline}. "
            f"Download it once with network access (`hf download {repo_id} --repo-type dataset`, or run "
            "without HF_HUB_OFFLINE), point HF_HUB_CACHE at a cache that holds it, or pass a local directory "
            "as dataset="
        ) from e
