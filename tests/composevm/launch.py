"""Start one service the way a container starts: its own filesystem view, user, working dir and environment.

Runs as root inside `unshare --mount --pid --fork --mount-proc` (a private mount and PID namespace; the network
namespace is the VM's). It builds a new root on a tmpfs: every top-level folder of this machine is bind-mounted
except /tmp (a fresh tmpfs, as in a container; for the kit's images root's home too), folders on the way to a
volume target are rebuilt on the tmpfs child by child (so creating a mount point never touches the host), each
volume source is bind-mounted at its target (read-only when the model says so), /dev/shm is a private tmpfs of
`shm_size` unless `ipc: host`; then it chroots, changes to the working dir, drops to the service's uid/gid and
execs the command. Nothing it mounts is visible outside its mount namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
_libc = ctypes.CDLL(None, use_errno=True)
SKIP_TOP = {"tmp", "lost+found"}


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                   data.encode() if data else None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} -> {target}: {os.strerror(err)}")


def _bind(source: str, target: str, read_only: bool = False) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        _mount("none", target, None, MS_REMOUNT | MS_BIND | MS_RDONLY)


def _ancestors(path: str) -> list[str]:
    parts = Path(path).parts[1:]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts))]


def _populate(host_dir: str, new_dir: str, expand: set[str], files: dict[str, str]) -> None:
    """Mirror host_dir into new_dir: bind each child, except folders in `expand` (rebuilt child by child)."""
    for name in sorted(os.listdir(host_dir)):
        hp = os.path.join(host_dir, name)
        np_ = new_dir + hp
        if host_dir == "/" and name in SKIP_TOP:
            continue
        if hp in files:
            continue  # written later
        if os.path.islink(hp):
            os.symlink(os.readlink(hp), np_)
        elif os.path.isdir(hp):
            os.mkdir(np_)
            if hp in expand:
                _populate(hp, new_dir, expand, files)
            else:
                _bind(hp, np_)
        elif os.path.exists(hp):
            Path(np_).touch()
            _bind(hp, np_)


def build_root(spec: dict) -> str:
    root = spec["root"]
    os.makedirs(root, exist_ok=True)
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", 0, "mode=0755")
    private = spec.get("private", {})
    targets = [m["target"] for m in spec["mounts"]] + list(spec["files"]) + list(spec["dirs"]) + spec["tmpfs"] + list(
        private)
    expand = {a for t in targets for a in _ancestors(t) if os.path.isdir(a) and not os.path.islink(a)}
    _populate("/", root, expand, spec["files"])
    for t in spec["tmpfs"]:
        os.makedirs(root + t, exist_ok=True)
        _mount("tmpfs", root + t, "tmpfs", 0, "mode=1777")
    for path, mode in private.items():  # an empty folder of the image's own (root's home)
        os.makedirs(root + path, exist_ok=True)
        _mount("tmpfs", root + path, "tmpfs", 0, f"mode={mode:o}")
    if spec.get("shm_bytes"):
        _mount("tmpfs", root + "/dev/shm", "tmpfs", 0, f"mode=1777,size={spec['shm_bytes']}")
    for path, content in spec["files"].items():
        os.makedirs(os.path.dirname(root + path), exist_ok=True)
        Path(root + path).write_text(content)
    for path, uid in spec["dirs"].items():
        os.makedirs(root + path, exist_ok=True)
        os.chown(root + path, uid, uid)
    for m in sorted(spec["mounts"], key=lambda m: len(Path(m["target"]).parts)):
        target = root + m["target"]
        if os.path.isdir(m["source"]):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                Path(target).touch()
        _bind(m["source"], target, m.get("read_only", False))
    return root


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    root = build_root(spec)
    os.chroot(root)
    os.chdir(spec["workdir"] or "/")
    os.setgroups([])
    os.setgid(spec["gid"])
    os.setuid(spec["uid"])
    argv = spec["argv"]
    try:
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as exc:
        print(f"compose-vm: cannot exec {argv[0]!r}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv[1])
