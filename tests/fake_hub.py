"""A local stand-in for huggingface_hub's HfApi and snapshot_download (the tests are offline)."""

import fnmatch
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub


class FakeHub:
    """Repos are folders under ``root``; downloads copy the allowed files into a cache."""

    def __init__(self, root: Path):
        self.root, self.downloads, self.commits = root, [], []
        self.repos, self.branches = [], []

    def api(self, token=None):
        hub = self

        class Api:
            def create_repo(self, repo_id, private=None, exist_ok=False):
                (hub.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
                hub.repos.append((repo_id, private, token))
                return SimpleNamespace(repo_id=repo_id)

            def create_branch(self, repo_id, branch, exist_ok=False):
                hub.branches.append((repo_id, branch))

            def upload_folder(self, repo_id, folder_path, **kwargs):
                shutil.copytree(folder_path, hub.root / repo_id, dirs_exist_ok=True)
                hub.commits.append((repo_id, kwargs))
                return SimpleNamespace(commit_url=f"https://hub/{repo_id}/commit/1")

        return Api()

    def snapshot_download(self, repo_id, revision=None, token=None, allow_patterns=None):
        self.downloads.append((repo_id, revision, tuple(allow_patterns)))
        repo = self.root / repo_id
        if not repo.is_dir():
            raise huggingface_hub.errors.LocalEntryNotFoundError(f"no repo {repo_id}")
        cache = self.root.parent / "cache" / repo_id
        for path in repo.rglob("*"):
            rel = path.relative_to(repo).as_posix()
            if path.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (cache / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, cache / rel)
        return str(cache)
