"""Task images, built offline: FROM the sandbox base image (mmdebstrap + `docker import`, no
registry), with the task's repository snapshot at its base commit copied in.

The repository goes to `REPO_COPY` in the image, owned by root and read-only to the agent; each
container copies it into a size-capped tmpfs at the task's workdir (/testbed), so the agent's
disk use is bounded and the image stays pristine. In the image the repository has one branch
(`main`, at `base_commit`), no remotes, no tags, no reflog and nothing after the base: the
history the model sees ends where the task starts.

A prebuilt image named by the instance (`image`) is used as it is.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import threading
from pathlib import Path

from envs.sandbox.base import SandboxError, SandboxUnavailable
from envs.swe.tasks import SWEInstance

REPO_COPY = "/opt/cwm-rl/repo"
TASK_REPOSITORY = "cwm-rl/swe-task"
SKIP = {"__pycache__", ".pytest_cache", ".mypy_cache", ".tox"}
# The fixed identity and date of a base commit made from plain files, so its sha is known in advance
# (envs/swe/data/make_tasks.py makes the same commit on the host).
COMMIT_ENV = ("HOME=/tmp GIT_CONFIG_NOSYSTEM=1 GIT_AUTHOR_NAME=cwm-rl GIT_AUTHOR_EMAIL=swe@cwm-rl.invalid "
              "GIT_COMMITTER_NAME=cwm-rl GIT_COMMITTER_EMAIL=swe@cwm-rl.invalid "
              "GIT_AUTHOR_DATE=2025-01-01T00:00:00+00:00 GIT_COMMITTER_DATE=2025-01-01T00:00:00+00:00")
PREPARE = """set -e
cd {repo}
export {commit_env}
if [ ! -d .git ]; then git init -q -b main && git add -A && git commit -q --no-gpg-sign -m base; fi
git checkout -q -f {base} 2>/dev/null || {{ echo "base commit {base} is not in the repository snapshot" >&2; exit 3; }}
git checkout -q -B main
for remote in $(git remote); do git remote remove "$remote"; done
git for-each-ref --format='%(refname)' | grep -vx refs/heads/main | xargs -r -n1 git update-ref -d
git reflog expire --expire=now --all && git gc -q --prune=now
test "$(git rev-parse HEAD)" = "{base}" || {{ echo "HEAD is $(git rev-parse HEAD), not the base commit {base}" >&2; exit 3; }}
git config user.name agent && git config user.email agent@cwm-rl.invalid
chmod -R a+rX,go-w .
"""
_build_lock = threading.Lock()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not SKIP & set(p.relative_to(root).parts))


def _context(instance: SWEInstance, source: Path, base_image: str) -> tuple[bytes, str]:
    """The build context (a tar: Dockerfile + the snapshot) and a hash of everything in it."""
    script = PREPARE.format(repo=REPO_COPY, commit_env=COMMIT_ENV, base=instance.base_commit)
    dockerfile = (f"FROM {base_image}\nCOPY repo {REPO_COPY}\nCOPY prepare.sh /tmp/prepare.sh\n"
                  f"RUN sh /tmp/prepare.sh && rm /tmp/prepare.sh\nLABEL cwm-rl.swe.instance={json.dumps(instance.instance_id)}\n")
    digest = hashlib.sha256(dockerfile.encode() + script.encode())
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))

        add("Dockerfile", dockerfile.encode())
        add("prepare.sh", script.encode())
        for path in _files(source):
            relative = path.relative_to(source).as_posix()
            data = path.read_bytes()
            in_git = relative.startswith(".git/")
            add(f"repo/{relative}", data, (path.stat().st_mode & 0o777) if in_git else 0o644)  # plain files: one mode, one sha
            digest.update(relative.encode() + b"\0" + hashlib.sha256(data).digest())
    return buffer.getvalue(), digest.hexdigest()[:12]


def image_tag(instance_id: str, digest: str) -> str:
    slug = re.sub(r"[^a-z0-9_.-]+", "-", instance_id.lower()).strip("-.")[:100] or "task"
    return f"{TASK_REPOSITORY}:{slug}-{digest}"


def task_image(instance: SWEInstance, client=None, base_image: str | None = None, log=None) -> str:
    """The image an instance runs in: its prebuilt `image`, or one built here from `repo_dir` (cached
    by content: a second call costs one image lookup). SandboxUnavailable while the daemon does not answer."""
    import requests

    if instance.image:
        return instance.image
    try:
        return _built_image(instance, client, base_image, log)
    except requests.exceptions.ConnectionError as e:
        raise SandboxUnavailable(f"the image of {instance.instance_id} cannot be looked up or built: the Docker daemon does "
                                 f"not answer ({e}); it stopped or is restarting") from e


def _built_image(instance: SWEInstance, client, base_image: str | None, log) -> str:
    import docker

    source = instance.source_dir()
    if source is None or not source.is_dir():
        raise SandboxError(f"instance {instance.instance_id!r}: repo_dir {source} is not a folder; "
                           "load tasks with envs.swe.load_tasks (it resolves repo_dir against the tasks file)")
    client = client or docker.from_env(timeout=300)
    if base_image is None:
        from envs.sandbox.rootfs import docker_base_image

        base_image = docker_base_image(client, log=log)
    context, digest = _context(instance, source, base_image)
    tag = image_tag(instance.instance_id, digest)
    with _build_lock:  # one build per tag at a time in this process; Docker caches across processes
        try:
            client.images.get(tag)
            return tag
        except docker.errors.ImageNotFound:
            pass
        if log:
            log(f"building {tag} from {source}")
        try:
            client.images.build(fileobj=io.BytesIO(context), custom_context=True, tag=tag, rm=True, forcerm=True,
                                network_mode="none", labels={"cwm-rl.swe": "1"})
        except docker.errors.BuildError as e:
            output = "".join(str(chunk.get("stream", "") or chunk.get("error", "")) for chunk in e.build_log)
            raise SandboxError(f"building the image of {instance.instance_id} failed: {e.msg}\n{output[-2000:]}") from None
    return tag

