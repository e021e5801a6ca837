"""The plan cache is only as right as its questions: every host read of a launch's
compile must be a question written down in the journal (launch/probe.py).

Each test runs one launch as the ordinary user under an audit hook (sys.addaudithook:
``open``, directory listings, programs run, connections, libraries loaded) that is
active from the moment plancache starts recording until ``plancache.save``.  What
probe's own questions read is theirs; every other read must be of a file whose
identity the journal holds by the time the program is saved (``file_identity``,
``image_text``, ``env_file``), or be on the allow-list below, each entry with its
reason.  A new host read in the
compile path (a file opened, a directory listed, a program run) makes these tests
name it; ``test_the_audit_sees_a_read_nobody_recorded`` plants one to prove it.

os.stat and its kin raise no audit event: a new ``os.path.isdir`` in the compile path is
not seen here (review keeps those in probe.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import Mesobox, User, make_oci_image
from run_support import make_squashfs
from settled_support import age, rootfs_an_hour_old, world_file, world_image

# Runs `mesobox ARGV…` with the audit hook; writes what it saw to LOG at plancache.save.
DRIVER = r'''
import os, sys

log_path, plant, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
import json
from mesobox.launch import plancache, probe

WATCHED = {"open", "os.listdir", "os.scandir", "os.walk", "glob.glob", "subprocess.Popen", "os.system",
           "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty", "socket.connect",
           "socket.getaddrinfo", "ctypes.dlopen"}
CONTROL = {"record", "finish", "untracked", "settled", "pin", "note_environment", "unchanged", "config_files"}
events, inside = [], [0]


def plain(value):
    try:
        value = os.fspath(value)
    except TypeError:
        return value if isinstance(value, (int, type(None))) else repr(value)
    return os.fsdecode(value)


def hook(event, args):
    if event in WATCHED and not inside[0] and probe.journal is not None:
        events.append([event, [plain(a) for a in args[:3]]])


def answering(question):
    def asked(*args, **kwargs):
        inside[0] += 1  # what a question reads to answer is the question's
        try:
            return question(*args, **kwargs)
        finally:
            inside[0] -= 1
    return asked


for name, value in list(vars(probe).items()):
    if callable(value) and getattr(value, "__module__", "") == probe.__name__ and not name.startswith("_") \
            and name not in CONTROL:
        setattr(probe, name, answering(value))

real_save = plancache.save


def save(program, config):
    seen, journal = list(events), probe.journal
    stdlib = os.path.dirname(os.__file__)
    with open(log_path, "w") as f:
        json.dump({"events": seen, "recording": journal is not None,
                   "journal": [[q, list(a)] for q, a, _ in journal or ()], "cwd": os.getcwd(),
                   "package": os.path.dirname(os.path.dirname(plancache.__file__)), "stdlib": stdlib,
                   "sys_path": [os.path.abspath(p) for p in sys.path],
                   "pid": os.getpid()}, f)
    real_save(program, config)


plancache.save = save
if plant:  # a read nobody records, in the compile path
    from mesobox.launch import specbuild

    real_make_spec = specbuild.make_spec

    def make_spec(*args, **kwargs):
        with open(plant) as f:
            f.read()
        return real_make_spec(*args, **kwargs)

    specbuild.make_spec = make_spec
sys.addaudithook(hook)
from mesobox.cli import main

sys.exit(main(argv))
'''


class Audit:
    """One audited launch as ``user``, with its own runtime dir and store."""

    def __init__(self, mesobox: Mesobox, user: User, world_tmp: Path) -> None:
        self.mesobox, self.user, self.tmp = mesobox, user, world_tmp
        self.runtime = world_tmp / "run"
        self.store = mesobox.store_root / user.name
        self.driver = world_tmp / "driver.py"
        self.driver.write_text(DRIVER)
        os.chmod(self.driver, 0o644)
        self.env: dict[str, str] = {}

    def __call__(self, *args: str, plant: str = "") -> list[str]:
        """The reads of the launch ``mesobox exec ARGS…`` that nothing explains, one line
        each (an assertion shows them all)."""
        log = self.tmp / "audit.json"
        log.unlink(missing_ok=True)
        env = {**self.mesobox.base_env(), "MESOBOX_RUNTIME_DIR": str(self.runtime),
               "MESOBOX_STORE": str(self.store), **self.env}
        proc = self.user.run([self.mesobox.python, str(self.driver), str(log), plant, "exec", *args],
                             env=env, cwd="/", timeout=120)
        assert proc.returncode == 0, proc.stderr.decode()
        assert log.exists(), "the launch saved no program: nothing was audited"
        seen = json.loads(log.read_text())
        assert seen["recording"], "the launch recorded nothing: nothing was audited"
        return unexplained(seen, self)

    def allowed(self, seen: dict[str, Any], path: str) -> bool:
        package, stdlib, pid = str(seen["package"]), str(seen["stdlib"]), seen["pid"]
        site = self.env.get("MESOBOX_SITE_CONFIG", "/nonexistent")
        user_config = str(self.user.home / ".config" / "mesobox" / "mesobox.toml")
        return (
            # mesobox's own modules (each one is part of the key: plancache._package) and
            # the directories the import system lists to find them
            (_under(path, package) and (path.endswith((".py", ".pyc")) or os.path.isdir(path)))
            # the interpreter's standard library: part of the key (sys.hexversion)
            or _under(path, stdlib)
            # the import system lists each sys.path entry it searches
            or path in seen["sys_path"]
            # the runtime dir: mesobox's own state (the shared mounts, the workspace, the
            # seccomp cache, whose names carry what a compiled filter depends on); a saved
            # program acts there again at every launch
            or _under(path, str(self.runtime))
            # the runtime dir's trust check (paths.runtime_dir) climbs its ancestors as ".."
            # from a dirfd and reads the overflow uid; every launch checks again
            # (execute.reap_stale_mounts)
            or path in ("..", "/proc/sys/kernel/overflowuid")
            # this process's own state (uid_map, mountinfo, a reopened fd); /dev/null
            or path.startswith(("/proc/self/", "/proc/thread-self/", f"/proc/{pid}/")) or path == "/dev/null"
            # the config files: part of the key (probe.config_files)
            or path in (site, user_config)
        )


def _none(problems: list[str]) -> None:
    assert not problems, "reads nobody recorded:\n  " + "\n  ".join(problems)


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def unexplained(seen: dict[str, Any], audit: Audit) -> list[str]:
    cwd = str(seen["cwd"])
    asked = set()
    for question, args in seen["journal"]:
        if question in ("file_identity", "env_file"):
            asked.add(os.path.join(cwd, args[0]))
        elif question == "image_file":
            asked.add(os.path.join(cwd, args[0], args[1]))
    problems = []
    for event, args in seen["events"]:
        target = args[0] if args else None
        if event in ("open", "os.listdir", "os.scandir", "os.walk", "glob.glob"):
            if isinstance(target, int) or target is None:
                continue  # an fd: opened (and seen) before
            if event == "open" and not _reads(args[2]):
                continue  # made or written (a cache, a lock), or a directory to work from: no read
            path = target if target == ".." else os.path.normpath(os.path.join(cwd, target))
            if path in asked or audit.allowed(seen, path):
                continue
        elif event == "ctypes.dlopen" and target is None:
            continue  # the process's own symbols (libc): no file
        elif event == "ctypes.dlopen" and str(target).startswith("libseccomp.so"):
            # The seccomp compiler (isolation/seccomp.py): loaded by its soname, while the
            # file it resolves to is asked through probe.file_identity (_library_stamp),
            # so a library upgrade compiles the saved program again.
            continue
        elif event in ("os.posix_spawn", "os.fork") and _mount_helper(target):
            continue  # squashmount.py: mounting is an action the saved program repeats (attach)
        problems.append(f"{event} {target}")
    return problems


def _reads(flags: object) -> bool:
    """Whether open(2) with these flags reads a file's content."""
    if not isinstance(flags, int):
        return True
    if flags & (os.O_DIRECTORY | os.O_PATH | os.O_CREAT):
        return False
    return flags & os.O_ACCMODE != os.O_WRONLY


def _mount_helper(target: object) -> bool:
    return target is None or os.path.basename(str(target)).startswith(("squashfuse", "fusermount"))


@pytest.fixture()
def audit(mesobox: Mesobox, user: User, world_tmp: Path) -> Audit:
    return Audit(mesobox, user, world_tmp)


@pytest.fixture()
def image(world_tmp: Path) -> Path:
    return world_image(world_tmp / "image")


@pytest.mark.userns
def test_a_directory_launch_reads_only_what_it_records(audit: Audit, image: Path, world_tmp: Path) -> None:
    src = world_tmp / "src"
    src.mkdir(mode=0o755)
    env_file = world_file(world_tmp / "env", "FROM_FILE=1\n")
    _none(audit("-B", f"{src}:/data", "--env-file", str(env_file), "-e", "A=b", "-w", "/data",
                str(image), "true"))


@pytest.mark.userns
def test_a_squashfs_launch_reads_only_what_it_records(audit: Audit, image: Path, world_tmp: Path) -> None:
    sqfs = make_squashfs(image, world_tmp / "image.sqfs")
    age(sqfs)
    _none(audit(str(sqfs), "true"))


@pytest.mark.userns
def test_a_stored_image_launch_reads_only_what_it_records(
    audit: Audit, mesobox: Mesobox, user: User, world_tmp: Path
) -> None:
    layout = make_oci_image(world_tmp / "oci", "v1", [rootfs_an_hour_old], ["--config.env=FROM=image"])
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    ref = f"oci:{layout}:v1"
    pulled = mesobox("pull", "-q", "--format", "dir", ref, as_user=user)
    assert pulled.returncode == 0, pulled.stderr.decode()
    _none(audit(ref, "true"))


@pytest.mark.userns
def test_options_that_read_host_files_record_them(audit: Audit, image: Path, world_tmp: Path) -> None:
    profile = world_file(world_tmp / "profile.json", '{"defaultAction": "SCMP_ACT_ALLOW"}')
    overlay = world_tmp / "ovl"
    overlay.mkdir(mode=0o777)
    os.chmod(overlay, 0o777)
    extra = world_tmp / "extra"
    extra.mkdir(mode=0o755)
    audit.env["MESOBOX_SITE_CONFIG"] = str(world_file(world_tmp / "site.toml", f'default_binds = ["{extra}:/x"]\n'))
    _none(audit("--security-opt", f"seccomp={profile}", "--overlay", str(overlay), str(image), "true"))


@pytest.mark.userns
def test_the_audit_sees_a_read_nobody_recorded(audit: Audit, image: Path, world_tmp: Path) -> None:
    secret = world_file(world_tmp / "host-file", "anything\n")
    assert audit(str(image), "true", plant=str(secret)) == [f"open {secret}"]
