"""The plan cache (launch/plancache.py): a command line's launch program is saved
with the questions it asked the host (launch/probe.py) and run again only while every
answer is the same.

End to end as the ordinary user, each test with its own runtime dir.  A launch that
ran from a saved plan is recognised by a mark put into that plan: an extra line in
the /etc/passwd it carries (``mark``).  A test that changes what a plan depends on
then checks both that the mark is gone (the program was compiled again) and that the
container shows the change.  Files the plans depend on are dated an hour back: a
file changed in the last 2 s is never trusted by its timestamp (probe.settled), unless
it was not written since its last status change (its mtime older than its ctime: a
utime(2) to an hour ago does that too).
"""

from __future__ import annotations

import marshal
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import Mesobox, Registry, User, make_busybox_rootfs, make_oci_image
from run_support import make_squashfs, squashfuse_state
from settled_support import HOUR_AGO, age, rootfs_an_hour_old, world_file, world_image

MARK = "planned:x:4242:4242::/:/bin/sh"


@pytest.fixture()
def image(world_tmp: Path) -> Path:
    root = world_image(world_tmp / "image")
    (root / "data").mkdir()
    os.chmod(root / "data", 0o755)
    return root


class Launch:
    """``mesobox exec`` as the test user with its own runtime dir (and plans dir)."""

    def __init__(self, mesobox: Mesobox, user: User, runtime: Path) -> None:
        self.mesobox, self.user, self.runtime = mesobox, user, runtime
        self.plans = runtime / "plans"

    def __call__(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                 ) -> subprocess.CompletedProcess[bytes]:
        return self.mesobox("exec", *args, as_user=self.user, cwd=cwd or "/", timeout=60,
                            env={"MESOBOX_RUNTIME_DIR": str(self.runtime), **(env or {})})

    def ok(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        proc = self(*args, env=env, cwd=cwd)
        assert proc.returncode == 0, proc.stderr.decode()
        return proc.stdout.decode()

    def files(self) -> list[Path]:
        return sorted(self.plans.iterdir()) if self.plans.exists() else []

    def mark(self) -> None:
        """Add MARK to the passwd of the one saved plan, as its owner would."""
        (plan,) = self.files()
        fmt, key, payload = marshal.loads(plan.read_bytes())
        files = dict(payload["program"]["files"])
        files["passwd"] += MARK + "\n"
        payload["program"]["files"] = tuple(files.items())
        plan.write_bytes(marshal.dumps((fmt, key, payload)))


@pytest.fixture()
def launch(mesobox: Mesobox, user: User, world_tmp: Path) -> Launch:
    return Launch(mesobox, user, world_tmp / "run")


def _marked(out: str) -> bool:
    return MARK in out


@pytest.mark.userns
def test_the_next_identical_launch_runs_the_saved_program(launch: Launch, image: Path, user: User) -> None:
    script = 'echo "FOO=$FOO"; id -un; cat /etc/passwd'
    first = launch.ok(str(image), "sh", "-c", script, env={"FOO": "one"})
    assert "FOO=one" in first and not _marked(first)
    (plan,) = launch.files()
    st = plan.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (user.uid, 0o600)
    assert oct(launch.plans.stat().st_mode & 0o777) == oct(0o700)
    launch.mark()
    second = launch.ok(str(image), "sh", "-c", script, env={"FOO": "two"})
    # The saved program ran (the mark), with this launch's environment, not the first's.
    assert _marked(second) and "FOO=two" in second and user.name in second
    assert launch.files() == [plan]


@pytest.mark.userns
def test_a_saved_program_runs_without_the_compiler(launch: Launch, image: Path) -> None:
    """What the plan saves: the second launch imports neither the option parser, the
    config loader, the spec builder, the planner nor the seccomp compiler."""
    compiler = ("mesobox.cli.run", "mesobox.config", "mesobox.launch.specbuild", "mesobox.launch.mountplan",
                "mesobox.isolation.seccomp", "mesobox.launch.launcher", "mesobox.errors")

    def imported() -> set[str]:
        proc = launch(str(image), "true", env={"PYTHONPROFILEIMPORTTIME": "1"})
        assert proc.returncode == 0, proc.stderr.decode()
        return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.decode().splitlines() if "|" in line}

    assert set(compiler) <= imported()
    assert set(compiler) & imported() == set()


@pytest.mark.userns
def test_e_options_take_this_launchs_host_values(launch: Launch, image: Path) -> None:
    script = "echo $FOO $BAR; cat /etc/passwd"
    assert launch.ok("-e", "FOO", "-e", "BAR=fixed", str(image), "sh", "-c", script, env={"FOO": "a"}).startswith("a ")
    launch.mark()
    out = launch.ok("-e", "FOO", "-e", "BAR=fixed", str(image), "sh", "-c", script, env={"FOO": "b"})
    assert _marked(out) and out.splitlines()[0] == "b fixed"


@pytest.mark.userns
def test_an_edited_image_passwd_compiles_again(launch: Launch, image: Path) -> None:
    launch.ok(str(image), "cat", "/etc/passwd")
    launch.mark()
    passwd = image / "etc" / "passwd"
    passwd.write_text(passwd.read_text() + "added:x:7777:7777::/:/bin/sh\n")
    os.utime(passwd, (HOUR_AGO + 60, HOUR_AGO + 60))
    out = launch.ok(str(image), "cat", "/etc/passwd")
    assert not _marked(out) and "added:x:7777" in out


@pytest.mark.userns
def test_a_passwd_changed_seconds_ago_is_not_trusted(launch: Launch, image: Path) -> None:
    (image / "etc" / "passwd").touch()  # within the racy window: its timestamp proves nothing yet
    launch.ok(str(image), "true")
    assert launch.files() == []


@pytest.mark.userns
def test_a_bind_source_gone_is_the_usual_error(launch: Launch, image: Path, world_tmp: Path) -> None:
    src = world_tmp / "src"
    src.mkdir(mode=0o755)
    (src / "f").write_text("here\n")
    launch.ok("-B", f"{src}:/data", str(image), "cat", "/data/f", "/etc/passwd")
    launch.mark()
    assert _marked(launch.ok("-B", f"{src}:/data", str(image), "cat", "/data/f", "/etc/passwd"))
    (src / "f").unlink()
    src.rmdir()
    proc = launch("-B", f"{src}:/data", str(image), "cat", "/data/f", "/etc/passwd")
    assert proc.returncode == 2 and proc.stderr.decode() == f"mesobox: error: bind source {src} does not exist\n"


@pytest.mark.userns
def test_a_bind_source_that_became_a_symlink_compiles_again(launch: Launch, image: Path, world_tmp: Path) -> None:
    a, b = world_tmp / "a", world_tmp / "b"
    for d, text in ((a, "from a\n"), (b, "from b\n")):
        d.mkdir(mode=0o755)
        (d / "f").write_text(text)
    link = world_tmp / "link"
    link.symlink_to(a)
    args = ("-B", f"{link}:/data", str(image), "cat", "/data/f", "/etc/passwd")
    assert launch.ok(*args).startswith("from a")
    launch.mark()
    assert _marked(launch.ok(*args))
    link.unlink()
    link.symlink_to(b)
    out = launch.ok(*args)
    assert not _marked(out) and out.startswith("from b")


@pytest.mark.userns
def test_a_mount_point_made_in_the_image_compiles_again(launch: Launch, image: Path, world_tmp: Path) -> None:
    src = world_tmp / "src"
    src.mkdir(mode=0o755)
    args = ("-B", f"{src}:/opt/new/place", str(image), "sh", "-c", "cat /etc/passwd; ls /opt/new")
    launch.ok(*args)  # /opt is missing: / is rebuilt as a skeleton
    launch.mark()
    assert _marked(launch.ok(*args))
    (image / "opt" / "new" / "place").mkdir(parents=True)
    os.chmod(image / "opt", 0o755)
    os.chmod(image / "opt" / "new", 0o755)
    out = launch.ok(*args)
    assert not _marked(out) and "place" in out


@pytest.mark.userns
def test_another_working_directory_or_config_has_its_own_plan(launch: Launch, image: Path, world_tmp: Path) -> None:
    one, two = world_tmp / "one", world_tmp / "two"
    for d in (one, two):
        d.mkdir()
        os.chmod(d, 0o777)
    args = (str(image), "sh", "-c", "pwd; ls /data; cat /etc/passwd")
    assert launch.ok(*args, cwd=one).splitlines()[0] == str(one)
    launch.mark()
    assert launch.ok(*args, cwd=two).splitlines()[0] == str(two)
    assert len(launch.files()) == 2
    # A site config with a default bind: a new key, and its bind is there.
    extra = world_tmp / "extra"
    extra.mkdir(mode=0o755)
    (extra / "from-extra").write_text("")
    site = world_tmp / "site.toml"
    site.write_text(f'default_binds = ["{extra}:/data"]\n')
    os.chmod(site, 0o644)
    age(site)
    env = {"MESOBOX_SITE_CONFIG": str(site)}
    assert launch.ok(*args, cwd=one, env=env).splitlines()[1] == "from-extra"
    site.write_text("default_binds = []\n")
    age(site)  # dated like before: a new size and ctime still tell the edit
    out = launch.ok(*args, cwd=one, env=env)
    assert "from-extra" not in out and not _marked(out)
    # The first plan is untouched by all this.
    assert _marked(launch.ok(*args, cwd=one))


@pytest.mark.userns
@pytest.mark.parametrize("case", ["squashfs-no-linger", "fakeroot", "turned-off", "debug"])
def test_launches_not_recorded_save_no_plan(launch: Launch, image: Path, world_tmp: Path, case: str) -> None:
    args: list[str] = [str(image)]
    env: dict[str, str] = {}
    if case == "squashfs-no-linger":  # supervised: the supervisor releases the mount
        sqfs = make_squashfs(image, world_tmp / "image.sqfs")
        age(sqfs)
        args, env = [str(sqfs)], {"MESOBOX_SQUASHFS_LINGER": "0"}
    elif case == "fakeroot":  # the test user has a sub-id range: newuidmap, so supervised
        if not all(os.access(f"/usr/bin/{tool}", os.X_OK) for tool in ("newuidmap", "newgidmap")):
            pytest.skip("without newuidmap/newgidmap --fakeroot maps one id and needs no supervisor")
        args = ["--fakeroot", *args]
    elif case == "turned-off":
        env = {"MESOBOX_PLAN_CACHE": "0"}
    else:
        args = ["--debug", *args]
    for _ in range(2):
        launch.ok(*args, "true", env=env)
    assert launch.files() == []


@pytest.mark.userns
def test_a_squashfs_plan_attaches_to_the_shared_mount(
    launch: Launch, image: Path, world_tmp: Path, user: User
) -> None:
    sqfs = make_squashfs(image, world_tmp / "image.sqfs")
    age(sqfs)
    args = (str(sqfs), "sh", "-c", "cat /etc/passwd; ls /data")
    launch.ok(*args)
    launch.mark()
    for _ in range(2):
        assert _marked(launch.ok(*args))
    assert squashfuse_state(user.uid, str(launch.runtime)) == (1, 1)  # one lingering mount for all
    # Another file at the same path is another tree: compiled again, mounted anew.
    (image / "data" / "new").write_text("")
    sqfs.unlink()
    make_squashfs(image, sqfs)
    age(sqfs)
    out = launch.ok(*args)
    assert not _marked(out) and "new" in out.split()


@pytest.mark.userns
@pytest.mark.parametrize("fmt", ["dir", "squashfs"])
def test_a_stored_image_is_recorded_by_its_record(
    launch: Launch, mesobox: Mesobox, user: User, world_tmp: Path, fmt: str
) -> None:
    layout = make_oci_image(world_tmp / "oci", "v1", [make_busybox_rootfs], ["--config.env=FROM=image"])
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    ref = f"oci:{layout}:v1"
    pulled = mesobox("pull", "-q", "--format", fmt, ref, as_user=user)
    assert pulled.returncode == 0, pulled.stderr.decode()
    store = mesobox.store_root / user.name
    (record,) = (store / "images").glob("*.json")
    age(record, *(store / "squashfs").glob("*"), *(store / "rootfs").glob("*/etc/passwd"),
         *(store / "rootfs").glob("*/etc/group"))
    args = (ref, "sh", "-c", "echo $FROM; cat /etc/passwd")
    assert launch.ok(*args).startswith("image\n")
    launch.mark()
    assert _marked(launch.ok(*args))
    os.utime(record, (HOUR_AGO + 60, HOUR_AGO + 60))  # rewritten, as a new pull of the tag would
    out = launch.ok(*args)
    assert not _marked(out) and out.startswith("image\n")
    assert mesobox("rm", ref, as_user=user).returncode == 0
    proc = launch(*args)
    assert proc.returncode == 4 and b"is not in the store" in proc.stderr


@pytest.mark.userns
@pytest.mark.parametrize("how", ["group-writable", "owned-by-root", "dir-world-writable", "garbage"])
def test_a_plan_others_could_write_or_a_damaged_one_is_not_used(launch: Launch, image: Path, how: str) -> None:
    launch.ok(str(image), "cat", "/etc/passwd")
    launch.mark()
    (plan,) = launch.files()
    if how == "group-writable":
        os.chmod(plan, 0o620)
    elif how == "owned-by-root":
        os.chown(plan, 0, 0)
        os.chmod(plan, 0o644)
    elif how == "dir-world-writable":
        os.chmod(launch.plans, 0o777)
    else:
        plan.write_bytes(b"\x00garbage")
    out = launch.ok(str(image), "cat", "/etc/passwd")
    assert not _marked(out) and "root:x:0:0" in out


@pytest.mark.userns
def test_a_saved_program_that_fails_is_forgotten(launch: Launch, image: Path) -> None:
    launch.ok(str(image), "pwd")
    (plan,) = launch.files()
    fmt, key, payload = marshal.loads(plan.read_bytes())
    payload["program"]["cwd"] = "/no/such/dir"  # as if something it depends on went unasked
    plan.write_bytes(marshal.dumps((fmt, key, payload)))
    proc = launch(str(image), "pwd")
    assert proc.returncode == 125 and b"/no/such/dir does not exist" in proc.stderr
    assert launch.files() == []
    assert launch.ok(str(image), "pwd").strip() == "/"  # compiled afresh


@pytest.mark.userns
def test_concurrent_first_launches_leave_one_plan(launch: Launch, image: Path) -> None:
    with ThreadPoolExecutor(16) as pool:
        procs = list(pool.map(lambda _: launch(str(image), "true"), range(16)))
    assert [p.returncode for p in procs] == [0] * 16, [p.stderr for p in procs]
    assert [p.name for p in launch.files() if not p.name.endswith(".plan")] == []  # no temp file left
    assert len(launch.files()) == 1


@pytest.mark.slow
@pytest.mark.userns
def test_plans_are_bounded(launch: Launch, image: Path) -> None:
    from mesobox.launch.plancache import MAX_PLANS

    for i in range(MAX_PLANS + 6):
        launch.ok(str(image), "true", str(i))
    assert len(launch.files()) == MAX_PLANS


# --- options that read host files: recorded like any other question ----------------------


@pytest.mark.userns
def test_a_seccomp_profile_file_is_recorded_by_its_identity(launch: Launch, image: Path, world_tmp: Path) -> None:
    profile = world_file(world_tmp / "profile.json", '{"defaultAction": "SCMP_ACT_ALLOW"}')
    args = ("--security-opt", f"seccomp={profile}", str(image), "sh", "-c", "uname -s; cat /etc/passwd")
    assert launch.ok(*args).startswith("Linux\n")
    launch.mark()
    assert _marked(launch.ok(*args))
    world_file(profile, '{"defaultAction": "SCMP_ACT_ALLOW", '
                         '"syscalls": [{"names": ["uname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}')
    out = launch.ok(*args)  # dated like before: its size and ctime tell the edit
    assert not _marked(out) and not out.startswith("Linux")  # busybox prints what uname(2) left: nothing


@pytest.mark.userns
def test_an_overlay_directory_is_recorded(launch: Launch, image: Path, world_tmp: Path) -> None:
    overlay = world_tmp / "ovl"
    overlay.mkdir()
    os.chmod(overlay, 0o777)
    args = ("--overlay", str(overlay), str(image), "sh", "-c",
            "cat /kept 2>/dev/null; echo kept > /kept; cat /etc/passwd")
    assert not launch.ok(*args).startswith("kept")
    launch.mark()
    out = launch.ok(*args)
    assert _marked(out) and out.startswith("kept\n")  # the saved program, on the same overlay
    overlay.rename(world_tmp / "ovl-old")  # gone: the launch makes a new one
    out = launch.ok(*args)
    assert not _marked(out) and not out.startswith("kept")


@pytest.mark.registry
@pytest.mark.userns
def test_a_launch_that_pulls_saves_no_plan_the_next_one_does(
    launch: Launch, registry: Registry, world_tmp: Path
) -> None:
    """What a registry sent is no question a launch can ask again (probe.py's rule for
    connections); the pulled image is, from the next launch on."""
    # Files an hour old, as an image's are: one built this second would keep the
    # next launch from saving for 2 s (probe.settled), whatever the pull did.
    layout = make_oci_image(world_tmp / "oci", "v1", [rootfs_an_hour_old], ["--config.env=FROM=image"])
    ref = "docker://" + registry.push_oci(layout, "v1", "mb/plancache")
    args = (ref, "sh", "-c", "echo $FROM; cat /etc/passwd")
    env = {"MESOBOX_DEFAULT_FORMAT": "dir"}  # no mksquashfs: only the connection tells
    assert launch.ok(*args, env=env).startswith("image\n")
    assert launch.files() == []
    launch.ok(*args, env=env)
    launch.mark()
    assert _marked(launch.ok(*args, env=env))


# --- right after a pull -------------------------------------------------------------------


@pytest.mark.userns
@pytest.mark.parametrize("fmt", ["dir", "squashfs"])
def test_launches_right_after_a_pull_save_and_use_a_plan(
    launch: Launch, mesobox: Mesobox, user: User, world_tmp: Path, fmt: str
) -> None:
    """The store writes each file whole and renames it into place, never in place, and
    dates its mtime before its ctime (Store.settle): a launch trusts it at once.  A pull
    of an image already present rewrites nothing, so the plan stays valid."""
    layout = make_oci_image(world_tmp / "oci", "v1", [rootfs_an_hour_old], ["--config.env=FROM=image"])
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    ref = f"oci:{layout}:v1"
    args = (ref, "sh", "-c", "echo $FROM; cat /etc/passwd")
    pulled = mesobox("pull", "-q", "--format", fmt, ref, as_user=user)
    assert pulled.returncode == 0, pulled.stderr.decode()
    assert launch.ok(*args).startswith("image\n")  # right after the pull: it saves its plan
    launch.mark()
    assert _marked(launch.ok(*args))
    (record,) = (mesobox.store_root / user.name / "images").glob("*.json")
    before = record.stat()
    pulled = mesobox("pull", "-q", "--format", fmt, ref, as_user=user)  # already present
    assert pulled.returncode == 0, pulled.stderr.decode()
    after = record.stat()
    assert (after.st_ino, after.st_mtime_ns, after.st_ctime_ns) == (before.st_ino, before.st_mtime_ns,
                                                                     before.st_ctime_ns)
    out = launch.ok(*args)
    assert _marked(out) and out.startswith("image\n")


# --- mesobox itself: every module file, or the RECORD of an install ----------------------


def _copy_of_mesobox(mesobox: Mesobox, world_tmp: Path) -> Path:
    """A source tree of mesobox of its own (a developer's checkout), dated an hour back."""
    tree = world_tmp / "tree"
    shutil.copytree(mesobox.src / "mesobox", tree / "mesobox", ignore=shutil.ignore_patterns("__pycache__"))
    for dirpath, _dirs, names in os.walk(tree):
        os.chmod(dirpath, 0o755)
        for name in names:
            os.chmod(os.path.join(dirpath, name), 0o644)
            age(Path(dirpath, name))
    return tree


@pytest.mark.userns
@pytest.mark.parametrize("module", ["launch/syscalls.py", "launch/squashmount.py", "image/store.py",
                                    "image/reference.py", "__init__.py"])
def test_an_edited_module_compiles_again(
    launch: Launch, image: Path, mesobox: Mesobox, world_tmp: Path, module: str
) -> None:
    """Every module file is part of the key, whatever it holds; an edit made in place
    (the same inode, its directory untouched) is seen too."""
    tree = _copy_of_mesobox(mesobox, world_tmp)
    args = (str(image), "cat", "/etc/passwd")
    env = {"PYTHONPATH": str(tree)}
    launch.ok(*args, env=env)
    launch.mark()
    assert _marked(launch.ok(*args, env=env))
    path = tree / "mesobox" / module
    with open(path, "a") as f:
        f.write("# edited\n")
    os.utime(path, (HOUR_AGO + 60, HOUR_AGO + 60))  # dated back: only its size and ctime tell
    out = launch.ok(*args, env=env)
    assert not _marked(out) and "root:x:0:0" in out


@pytest.mark.userns
def test_a_module_changed_seconds_ago_is_not_trusted(
    launch: Launch, image: Path, mesobox: Mesobox, world_tmp: Path
) -> None:
    tree = _copy_of_mesobox(mesobox, world_tmp)
    (tree / "mesobox" / "launch" / "syscalls.py").touch()  # its timestamps prove nothing yet
    launch.ok(str(image), "true", env={"PYTHONPATH": str(tree)})
    assert launch.files() == []


@pytest.mark.userns
def test_an_installed_copy_is_known_by_its_record(
    launch: Launch, image: Path, mesobox: Mesobox, world_tmp: Path
) -> None:
    """Installed by pip, mesobox is the RECORD file pip writes beside it at each install
    (every file with its hash): one stat(2) per launch stands for all its files."""
    from mesobox import __version__

    tree = _copy_of_mesobox(mesobox, world_tmp)
    info = tree / f"mesobox-{__version__}.dist-info"
    info.mkdir(mode=0o755)
    record = world_file(info / "RECORD", "mesobox/__init__.py,sha256=one,342\n")
    args = (str(image), "cat", "/etc/passwd")
    env = {"PYTHONPATH": str(tree)}
    launch.ok(*args, env=env)
    launch.mark()
    assert _marked(launch.ok(*args, env=env))
    os.replace(world_file(info / "RECORD.new", "mesobox/__init__.py,sha256=two,342\n"), record)  # reinstalled
    assert not _marked(launch.ok(*args, env=env))


@pytest.mark.userns
def test_a_record_planted_by_another_user_is_not_trusted(
    launch: Launch, image: Path, mesobox: Mesobox, world_tmp: Path, attacker: User
) -> None:
    """A source tree in a shared sticky directory: another user may create names beside
    it, not change it.  Their RECORD would freeze its key; it is not the package's
    owner's, so every module file still counts."""
    from mesobox import __version__

    tree = _copy_of_mesobox(mesobox, world_tmp)
    os.chmod(tree, 0o1777)
    info = tree / f"mesobox-{__version__}.dist-info"
    plant = f"mkdir {info} && echo x > {info}/RECORD && touch -d '1 hour ago' {info}/RECORD"
    planted = attacker.run(["sh", "-c", plant])
    assert planted.returncode == 0, planted.stderr.decode()
    args = (str(image), "cat", "/etc/passwd")
    env = {"PYTHONPATH": str(tree)}
    launch.ok(*args, env=env)
    launch.mark()
    assert _marked(launch.ok(*args, env=env))
    path = tree / "mesobox" / "launch" / "syscalls.py"
    with open(path, "a") as f:
        f.write("# edited\n")
    os.utime(path, (HOUR_AGO + 60, HOUR_AGO + 60))
    assert not _marked(launch.ok(*args, env=env))


# --- the parts, in this process --------------------------------------------------------


def test_the_journal_holds_each_question_once_and_replays_it(tmp_path: Path) -> None:
    from mesobox.launch import probe

    probe.record()
    try:
        assert probe.isdir(str(tmp_path)) and probe.isdir(str(tmp_path))
        assert not probe.exists(str(tmp_path / "x"))
        assert probe.realpath(str(tmp_path)) == os.path.realpath(tmp_path)
        journal = list(probe.journal or [])
    finally:
        probe.untracked()
    assert [q for q, _, _ in journal] == ["isdir", "exists", "realpath"]
    assert probe.unchanged(journal)
    (tmp_path / "x").write_text("")
    assert not probe.unchanged(journal)


def test_image_questions_are_about_the_file_not_its_place(tmp_path: Path) -> None:
    from mesobox.launch import probe

    (tmp_path / "etc").mkdir()
    passwd = tmp_path / "etc" / "passwd"
    passwd.write_text("root:x:0:0::/:/bin/sh\n")
    age(passwd)
    (tmp_path / "link").symlink_to("/etc/passwd")
    probe.record()
    try:
        assert probe.image_text(str(tmp_path), "etc/passwd") == "root:x:0:0::/:/bin/sh\n"
        assert probe.image_text(str(tmp_path), "link") == ""  # a symlink is not followed
        assert probe.image_exists(str(tmp_path), "etc") and not probe.image_exists(str(tmp_path), "opt")
        journal = list(probe.journal or [])
    finally:
        probe.untracked()
    assert probe.unchanged(journal)
    passwd.write_text("root:x:0:0::/:/bin/bash\n")  # same size, new inode times
    age(passwd)
    assert not probe.unchanged(journal)


def test_a_question_that_fails_now_means_compiling_again(tmp_path: Path) -> None:
    from mesobox.launch import probe

    env_file = tmp_path / "env"
    env_file.write_text("A=1\n")
    probe.record()
    try:
        assert probe.env_file(str(env_file)) == (("A", "1"),)
        journal = list(probe.journal or [])
    finally:
        probe.untracked()
    env_file.unlink()
    assert not probe.unchanged(journal)


def test_host_names_read_from_files_match_nss() -> None:
    import grp
    import pwd

    from mesobox.launch import probe

    for uid, gid in ((0, 0), (os.getuid(), os.getgid())):
        entry = pwd.getpwuid(uid)
        expected = (entry.pw_name, grp.getgrgid(gid).gr_name, entry.pw_dir, entry.pw_shell)
        assert probe.host_names(uid, gid) == expected


@pytest.mark.parametrize("conf", ["passwd: sss files\ngroup: files\n", "passwd: files\n", ""])
def test_host_names_ask_nss_unless_files_come_first(tmp_path: Path, conf: str) -> None:
    from mesobox.launch import probe

    (tmp_path / "nsswitch.conf").write_text(conf)
    (tmp_path / "passwd").write_text("u:x:5:6::/h:/bin/sh\n")
    (tmp_path / "group").write_text("g:x:6:\n")
    assert probe._files_names(5, 6, str(tmp_path)) is None
    (tmp_path / "nsswitch.conf").write_text("passwd: files systemd # local first\ngroup:  files\n")
    assert probe._files_names(5, 6, str(tmp_path)) == ("u", "g", "/h", "/bin/sh")
    assert probe._files_names(7, 6, str(tmp_path)) is None  # not in the file: NSS decides


def test_private_records(tmp_path: Path) -> None:
    from mesobox import paths

    d = tmp_path / "cache"
    assert paths.save_cached(str(d), "r", 1, ("sig",), {"a": (1, b"x")})
    assert paths.load_cached(str(d), "r", 1, ("sig",)) == {"a": (1, b"x")}
    assert paths.load_cached(str(d), "r", 1, ("other",)) is None
    assert paths.load_cached(str(d), "r", 2, ("sig",)) is None
    assert [p.name for p in d.iterdir()] == ["r"] and (d.stat().st_mode & 0o777) == 0o700
    os.chmod(d / "r", 0o666)
    assert paths.load_cached(str(d), "r", 1, ("sig",)) is None
    os.chmod(d / "r", 0o600)
    os.chmod(d, 0o770)
    assert paths.load_cached(str(d), "r", 1, ("sig",)) is None
    os.chmod(d, 0o700)
    (d / "r").write_bytes(b"\xffnot marshal")
    assert paths.load_cached(str(d), "r", 1, ("sig",)) is None


def test_compose_takes_host_values_at_each_call() -> None:
    from mesobox.launch.environ import compose

    recipe = (("PATH=/image/bin", "IMG=1"), False, (("FILE", "f"),), ("COPY", "SET=s"), "/home/u")
    env = dict(item.split("=", 1) for item in compose({"COPY": "c1", "HOST": "h"}, recipe))
    assert env == {"COPY": "c1", "HOST": "h", "PATH": "/image/bin", "IMG": "1", "FILE": "f", "SET": "s",
                   "HOME": "/home/u"}
    env = dict(item.split("=", 1) for item in compose({"COPY": "c2"}, recipe))
    assert env["COPY"] == "c2" and "HOST" not in env


def test_the_key_holds_every_module_of_a_source_tree() -> None:
    from mesobox import __version__
    from mesobox.launch import plancache

    code = plancache._package()
    assert code is not None
    version, python, top, files = code
    assert (version, python) == (__version__, sys.hexversion)
    expected = {str(p.relative_to(top)) for p in Path(top).rglob("*.py") if "__pycache__" not in p.parts}
    assert {entry[0] for entry in files} == expected
    assert {"launch/syscalls.py", "launch/squashmount.py", "image/store.py", "image/reference.py"} <= expected


def test_a_program_run_or_a_connection_while_recording_means_no_plan() -> None:
    import socket

    from mesobox.launch import probe

    probe.record()
    assert probe.isdir("/") and probe.journal is not None
    subprocess.run(["true"], check=True)  # what --mpi host's ompi_info and ldd do
    assert probe.finish() == (None, None)
    probe.record()
    with socket.socket() as server, socket.socket() as client:
        server.bind(("127.0.0.1", 0))
        server.listen()
        client.connect(server.getsockname())  # what a docker:// pull does
    assert probe.finish() == (None, None)


def test_a_file_the_store_wrote_is_settled_at_once_and_one_written_in_place_is_not(tmp_path: Path) -> None:
    from mesobox.image.store import Store
    from mesobox.launch import probe

    path = tmp_path / "record.json"
    path.write_text("{}")
    Store.settle(path)
    st = path.stat()
    assert st.st_mtime_ns < st.st_ctime_ns and probe.settled(st.st_mtime_ns, st.st_ctime_ns)
    path.write_text("[]")  # written in place: mtime and ctime are now, together
    st = path.stat()
    assert not probe.settled(st.st_mtime_ns, st.st_ctime_ns)
