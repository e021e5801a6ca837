"""RUN: one command in the stage's rootfs, through mesobox's own launch engine.

The container is what ``mesobox exec --fakeroot --contain --pid --overlay DIR ROOTFS
CMD`` would start (launch/specbuild.make_spec): root inside, the caller's sub-id range
mapped to 1… (newuidmap, as ``--fakeroot`` does), the host's network, a private /tmp,
/dev/shm and pid namespace (a daemon a step leaves behind dies with it), and the
rootfs as the lower layer of an overlay whose upper directory collects the step's
changes: that directory is the step's changeset (changes.py).

One difference from ``exec``: the image's own /etc/passwd and /etc/group stay visible
and writable (a launch binds generated read-only copies over them: the spec's
``identity_files`` setting is off), so ``useradd`` and packages that add system users
work as in ``docker build``.  The launcher runs the step in a forked child, so that the
build goes on after it.

Real root builds with ``--host-root``'s identity map (root is root): ids in the layers
are then the image's own, as for a rootless build.
"""

from __future__ import annotations

import os
from typing import Any

from mesobox.config import Config
from mesobox.image.build.context import resolve

MOUNT_DIRS = ("proc", "sys", "dev", "tmp", "etc")
MOUNT_FILES = ("etc/hosts", "etc/resolv.conf")


def prepare_rootfs(rootfs: str, workdir: str) -> None:
    """The mount points a launch needs, in the rootfs itself (not in any layer): a
    missing one would put a whole directory in a tmpfs skeleton, whose writes are lost.
    And the working directory (a base image's WorkingDir may not exist), as Docker makes it."""
    for rel in MOUNT_DIRS:
        path = os.path.join(rootfs, resolve(rootfs, rel))
        if not os.path.lexists(path):
            os.mkdir(path, 0o1777 if rel == "tmp" else 0o755)
    for rel in MOUNT_FILES:
        path = os.path.join(rootfs, resolve(rootfs, rel))
        if not os.path.lexists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))
    here = rootfs
    for part in resolve(rootfs, workdir.lstrip("/")).split("/"):
        here = os.path.join(here, part)
        if part and not os.path.lexists(here):
            os.mkdir(here, 0o755)


def run_command(config: Config, rootfs: str, overlay: str, argv: list[str], env: list[str], user: str,
                workdir: str) -> int:
    """Run ``argv`` in the rootfs, its changes kept in ``overlay``/upper; its exit status."""
    spec = _spec(config, rootfs, overlay, argv, env, user, workdir)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        from mesobox.launch.execute import in_child

        in_child(lambda: os._exit(_launch(spec, config, rootfs)))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except KeyboardInterrupt:
            continue  # the step got the same ^C from the terminal: wait for it to end
    return os.waitstatus_to_exitcode(status)


def _spec(config: Config, rootfs: str, overlay: str, argv: list[str], env: list[str], user: str,
          workdir: str) -> Any:
    from mesobox.launch.specbuild import Image, RunOptions, make_spec

    real_root = os.getuid() == 0
    opts = RunOptions(mode="exec", image=rootfs, args=tuple(argv), fakeroot=not real_root, host_root=real_root,
                      contain=True, cleanenv=True, pid=True, overlay=overlay, workdir=workdir or "/", net="host")
    image = Image(format="dir", path=rootfs, config={"Env": env, "User": user}, reference=rootfs)
    spec = make_spec(opts, config, image)
    return spec.replace(mesobox=spec.mesobox.replace(identity_files=False))


def _launch(spec: Any, config: Config, rootfs: str) -> int:
    """The step's container (launcher.launch: it may exec into the step, in this child)."""
    from mesobox.launch import launcher

    status: int = launcher.launch(spec, config)
    return status
