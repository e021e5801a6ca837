"""The flags people type, from Docker/Podman and Apptainer (issue 16, section 3), each
run through ``mesobox run``/``exec`` as the ordinary user and observed inside the
container: the mount table, files, limits, ids, resolv.conf, $HOME.  Each bad value is
one error line and a non-zero exit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import Mesobox, User, open_busybox_rootfs
from run_support import one_error_line

pytestmark = pytest.mark.userns


@pytest.fixture(scope="module")
def rootfs(shared_tmp: Path) -> Path:
    root = open_busybox_rootfs(shared_tmp / "flags-rootfs")
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1234:1235::/:/bin/sh\n"
                                         "nobody:x:65534:65534::/:/bin/false\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1235:\nnogroup:x:65534:\n")
    for name in ("passwd", "group"):
        os.chmod(root / "etc" / name, 0o644)
    return root


def _shared_dir(world_tmp: Path, name: str) -> Path:
    """A directory the test user may read and write, with one file in it."""
    path = world_tmp / name
    path.mkdir(mode=0o777)
    os.chmod(path, 0o777)
    (path / "f").write_text(name + "\n")
    os.chmod(path / "f", 0o666)
    return path


def _sh(mesobox: Mesobox, user: User, rootfs: Path, *opts: str, script: str, **kw: object) -> list[str]:
    proc = mesobox("exec", *opts, str(rootfs), "sh", "-c", script, as_user=user, **kw)  # type: ignore[arg-type]
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().splitlines()


def _refused(mesobox: Mesobox, user: User, rootfs: Path, *opts: str, env: dict[str, str] | None = None) -> str:
    proc = mesobox("exec", *opts, str(rootfs), "true", as_user=user, env=env)
    assert proc.returncode != 0, (opts, proc.stdout, proc.stderr)
    return one_error_line(proc.stderr)


def _mount_options(lines: list[str], target: str) -> tuple[str, set[str]]:
    """(fstype, options) of the last mount on ``target`` in /proc/self/mounts lines."""
    found = [line.split() for line in lines if len(line.split()) > 3 and line.split()[1] == target]
    assert found, (target, lines)
    return found[-1][2], set(found[-1][3].split(","))


def test_volume_mount_and_tmpfs(mesobox: Mesobox, user: User, rootfs: Path, world_tmp: Path) -> None:
    data, more = _shared_dir(world_tmp, "data"), _shared_dir(world_tmp, "more")
    script = ("cat /data/f /m2/f; touch /data/new 2>/dev/null && echo wrote || echo ro; "
              "touch /m2/new && echo wrote2; stat -c %a /t2; cat /proc/self/mounts")
    out = _sh(mesobox, user, rootfs, "-v", f"{data}:/data:ro", "--mount", f"type=bind,source={more},target=/m2",
              "--mount", "type=tmpfs,target=/scratch,tmpfs-size=1m", "--tmpfs", "/t2:size=2m,mode=700",
              script=script)
    assert out[:5] == ["data", "more", "ro", "wrote2", "700"]
    assert (more / "new").exists() and not (data / "new").exists()
    mounts = out[5:]
    fstype, options = _mount_options(mounts, "/scratch")
    assert fstype == "tmpfs" and {"size=1024k", "nosuid", "nodev"} <= options
    fstype, options = _mount_options(mounts, "/t2")
    assert fstype == "tmpfs" and {"size=2048k", "mode=700", "nosuid", "nodev"} <= options
    assert {"ro", "nosuid", "nodev"} <= _mount_options(mounts, "/data")[1]
    assert {"rw", "nosuid", "nodev"} <= _mount_options(mounts, "/m2")[1]
    # --mount readonly, and the long spelling of -v
    out = _sh(mesobox, user, rootfs, "--volume", f"{data}:/d", "--mount",
              f"type=bind,src={more},dst=/m3,readonly", script="touch /d/x && echo rw; touch /m3/x || echo ro")
    assert out == ["rw", "ro"]


@pytest.mark.parametrize("opts", [
    ["-v", "/data"],  # an anonymous volume
    ["-v", "named:/data"],  # a named volume
    ["-v", "/tmp:/data:z"],  # an SELinux label
    ["-v", "/tmp:relative"],
    ["-v", "/nonexistent-src:/data"],
    ["--mount", "type=volume,source=x,target=/x"],
    ["--mount", "type=bind,target=/x"],
    ["--mount", "type=bind,source=/tmp"],
    ["--mount", "type=bind,source=/tmp,target=/x,bind-propagation=shared"],
    ["--mount", "source=/tmp,target=/x"],
    ["--mount", "type=tmpfs,target=/x,readonly"],
    ["--mount", "type=tmpfs,target=/x,tmpfs-size=lots"],
    ["--tmpfs", "/x:mode=999"],
    ["--tmpfs", "/x:uid=0"],
    ["--tmpfs", "/"],
    ["--shm-size", "0"],
    ["--shm-size", "big"],
    ["--ulimit", "nofile"],
    ["--ulimit", "files=10"],
    ["--ulimit", "NOFILE=10"],
    ["--ulimit", "nofile=20:10"],
    ["--ulimit", "nofile=ten"],
    ["--platform", "linux"],
    ["--platform", "windows/amd64"],
    ["--no-mount", "proc"],
    ["--no-mount", "everything"],
    ["--dns", "8.8.8.8,not-an-ip"],
    ["--dns", "1.1.1.1\nnameserver 6.6.6.6"],
    ["--home", "/nonexistent-home"],
    ["--home", "/tmp:relative"],
    ["--user", "nosuchuser"],
    ["--user", "0:nosuchgroup"],
    ["-d"],
    ["--read-only", "--writable-tmpfs"],
    ["--read-only", "--overlay", "/tmp/anything"],
], ids=lambda opts: " ".join(opts))
def test_bad_values_are_one_line(mesobox: Mesobox, user: User, rootfs: Path, opts: list[str]) -> None:
    _refused(mesobox, user, rootfs, *opts)


def test_read_only_is_the_default_root(mesobox: Mesobox, user: User, rootfs: Path) -> None:
    out = _sh(mesobox, user, rootfs, "--read-only", script="touch /etc/x 2>/dev/null && echo rw || echo ro")
    assert out == ["ro"]
    assert "--read-only contradicts --writable-tmpfs" in _refused(mesobox, user, rootfs, "--read-only",
                                                                   "--writable-tmpfs=1m")


def test_user(mesobox: Mesobox, user: User, rootfs: Path) -> None:
    # One's own ids: accepted, a no-op (also by number alone: one's own group then).
    for spec in (str(user.uid), f"{user.uid}:{user.gid}"):
        assert _sh(mesobox, user, rootfs, "--user", spec, script="id -u; id -g") == [str(user.uid), str(user.gid)]
    # Other ids without --fakeroot: refused, saying why and what to use.
    for spec in ("1234", "app", "0", f"{user.uid}:0"):
        line = _refused(mesobox, user, rootfs, "-u", spec)
        assert "is not mapped in this container" in line, line
    proc = mesobox("exec", "--user", "app", str(rootfs), "true", as_user=user)
    assert b"hint: use --fakeroot" in proc.stderr
    # With --fakeroot and the user's sub-id range: honoured, names read in the image.
    for spec, want in (("1234", ["1234", "0"]), ("app", ["1234", "1235"]), ("nobody:app", ["65534", "1235"]),
                       ("1234:1235", ["1234", "1235"])):
        assert _sh(mesobox, user, rootfs, "--fakeroot", "--user", spec, script="id -u; id -g") == want, spec
    # An id beyond the sub-id range is not mapped even so.
    assert "is not mapped" in _refused(mesobox, user, rootfs, "--fakeroot", "--user", "70000")


def test_shm_size(mesobox: Mesobox, user: User, rootfs: Path) -> None:
    lines = _sh(mesobox, user, rootfs, "--shm-size", "8m", script="cat /proc/self/mounts")
    fstype, options = _mount_options(lines, "/dev/shm")
    assert fstype == "tmpfs" and {"size=8192k", "nosuid", "nodev"} <= options
    # without it, the host's /dev/shm (issue 12): not a tmpfs of that size
    lines = _sh(mesobox, user, rootfs, script="cat /proc/self/mounts")
    assert "size=8192k" not in _mount_options(lines, "/dev/shm")[1]


def test_ulimit(mesobox: Mesobox, user: User, rootfs: Path) -> None:
    out = _sh(mesobox, user, rootfs, "--ulimit", "nofile=100:200", "--ulimit", "core=0", "--ulimit",
              "nproc=500", script="ulimit -n; ulimit -Hn; ulimit -c; ulimit -u; ulimit -Hu")
    assert out == ["100", "200", "0", "500", "500"]
    # Raising the hard limit past what the kernel allows: its refusal, as one line.
    proc = mesobox("exec", "--ulimit", "nofile=unlimited", str(rootfs), "true", as_user=user)
    assert proc.returncode != 0
    assert "cannot set --ulimit nofile=unlimited:unlimited" in one_error_line(proc.stderr)


def test_init_is_pid_one(mesobox: Mesobox, user: User, rootfs: Path) -> None:
    host_ns = os.readlink("/proc/self/ns/pid")
    ns, pid = _sh(mesobox, user, rootfs, "--init", script="readlink /proc/self/ns/pid; echo $$")
    assert ns != host_ns and pid == "2"  # pid 1 is mesobox's init, the workload its child
    ns, pid = _sh(mesobox, user, rootfs, script="readlink /proc/self/ns/pid; echo $$")
    assert ns == host_ns


def test_platform(mesobox: Mesobox, user: User, rootfs: Path) -> None:
    machine = os.uname().machine
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    assert _sh(mesobox, user, rootfs, "--platform", f"linux/{arch}", script="echo ok") == ["ok"]
    other = "arm64" if arch == "amd64" else "amd64"
    line = _refused(mesobox, user, rootfs, "--platform", f"linux/{other}")
    assert f"this host runs linux/{arch}" in line


def test_accepted_docker_habits(mesobox: Mesobox, user: User, rootfs: Path) -> None:
    proc = mesobox("run", "-i", "-t", "--rm", "--interactive", "--tty", str(rootfs), "sh", "-c", "read x; echo $x",
                   as_user=user, input=b"through\n")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"through\n", b"")
    line = _refused(mesobox, user, rootfs, "--detach")
    assert "a detached container is an instance" in line
    proc = mesobox("run", "-d", str(rootfs), as_user=user)
    assert b"hint: mesobox instance start" in proc.stderr
    proc = mesobox("run", "-it", "--rm", str(rootfs), "sh", "-c", "read x; echo $x", as_user=user, input=b"bundled\n")
    assert (proc.returncode, proc.stdout) == (0, b"bundled\n"), proc.stderr
    # Refused before the image is looked for: a docker:// name is never pulled for nothing
    # (this registry does not exist; a pull would fail with another line).
    for flag in (["-d"], ["--platform", "windows/amd64"]):
        line = one_error_line(mesobox("run", *flag, "docker://127.0.0.1:9/nowhere/none:1", as_user=user).stderr)
        assert "instance" in line or "this host runs" in line, line


def test_containall(mesobox: Mesobox, user: User, rootfs: Path, world_tmp: Path) -> None:
    here = _shared_dir(world_tmp, "here")
    marker = user.home / "flags-marker"
    marker.write_text("x")
    os.chown(marker, user.uid, user.gid)
    try:
        script = ("echo ${FLAGS_VAR:-unset}; ls ~/flags-marker 2>/dev/null || echo nohome; pwd; "
                  "stat -f -c %T /tmp; readlink /proc/self/ns/pid; readlink /proc/self/ns/ipc")
        out = _sh(mesobox, user, rootfs, "--containall", script=script, cwd=here, env={"FLAGS_VAR": "set"})
        assert out[:4] == ["unset", "nohome", "/", "tmpfs"]
        assert out[4] != os.readlink("/proc/self/ns/pid") and out[5] != os.readlink("/proc/self/ns/ipc")
        # without it: all of those are the host's
        out = _sh(mesobox, user, rootfs, script=script, cwd=here, env={"FLAGS_VAR": "set"})
        assert out[:3] == ["set", f"{user.home}/flags-marker", str(here)]
        assert out[4:] == [os.readlink("/proc/self/ns/pid"), os.readlink("/proc/self/ns/ipc")]
    finally:
        marker.unlink()


def test_no_home_and_no_mount(mesobox: Mesobox, user: User, rootfs: Path, world_tmp: Path) -> None:
    here = _shared_dir(world_tmp, "cwd")
    marker = user.home / "flags-marker2"
    marker.write_text("x")
    os.chown(marker, user.uid, user.gid)
    tmp_marker = Path("/tmp") / f"flags-marker-{os.getpid()}"
    tmp_marker.write_text("x")
    try:
        script = f"ls ~/flags-marker2 2>/dev/null || echo nohome; ls {tmp_marker} 2>/dev/null || echo notmp; pwd"
        assert _sh(mesobox, user, rootfs, script=script, cwd=here) == [
            f"{user.home}/flags-marker2", str(tmp_marker), str(here)]
        assert _sh(mesobox, user, rootfs, "--no-home", script=script, cwd=here) == [
            "nohome", str(tmp_marker), str(here)]
        assert _sh(mesobox, user, rootfs, "--no-mount", "tmp,cwd", script=script, cwd=here) == [
            f"{user.home}/flags-marker2", "notmp", "/"]
        assert _sh(mesobox, user, rootfs, "--no-mount", "home", "--no-mount", "hostfs", script=script,
                   cwd=here) == ["nohome", str(tmp_marker), str(here)]
        # a site bind (default_binds), left out by its destination or with them all
        site = _shared_dir(world_tmp, "sitebind")
        env = {"MESOBOX_DEFAULT_BINDS": f"{site}:/site"}
        probe = "cat /site/f 2>/dev/null || echo nosite"
        assert _sh(mesobox, user, rootfs, script=probe, env=env) == ["sitebind"]
        assert _sh(mesobox, user, rootfs, "--no-mount", "/site", script=probe, env=env) == ["nosite"]
        assert _sh(mesobox, user, rootfs, "--no-mount", "bind-paths", script=probe, env=env) == ["nosite"]
    finally:
        marker.unlink()
        tmp_marker.unlink()


def test_dns(mesobox: Mesobox, user: User, rootfs: Path) -> None:
    out = _sh(mesobox, user, rootfs, "--dns", "192.0.2.1,2001:db8::1", "--dns", "192.0.2.2",
              script="cat /etc/resolv.conf; touch /etc/resolv.conf 2>/dev/null && echo rw || echo ro")
    assert out == ["nameserver 192.0.2.1", "nameserver 2001:db8::1", "nameserver 192.0.2.2", "ro"]
    if Path("/etc/resolv.conf").is_file():  # without it: the host's file
        host = Path("/etc/resolv.conf").read_text().splitlines()
        assert _sh(mesobox, user, rootfs, script="cat /etc/resolv.conf") == host


def test_home(mesobox: Mesobox, user: User, rootfs: Path, world_tmp: Path) -> None:
    homedir = _shared_dir(world_tmp, "althome")
    out = _sh(mesobox, user, rootfs, "--home", f"{homedir}:/home/me", script="echo $HOME; cd ~ && pwd; cat f",
              cwd="/")
    assert out == ["/home/me", "/home/me", "althome"]
    # SRC alone: bound where it is; the user's own home is not bound then
    check = f"echo $HOME; ls {user.home} >/dev/null 2>&1 && echo userhome || echo nouserhome"
    assert _sh(mesobox, user, rootfs, "--home", str(homedir), script=check, cwd="/") == [str(homedir), "nouserhome"]
    assert _sh(mesobox, user, rootfs, script=check, cwd="/") == [str(user.home), "userhome"]
    # -e HOME still wins, as over any default
    out = _sh(mesobox, user, rootfs, "--home", f"{homedir}:/home/me", "-e", "HOME=/elsewhere", script="echo $HOME")
    assert out == ["/elsewhere"]


def test_new_binds_obey_allowed_bind_sources(mesobox: Mesobox, user: User, rootfs: Path, world_tmp: Path) -> None:
    allowed = _shared_dir(world_tmp, "allowed")
    outside = _shared_dir(world_tmp, "outside")
    site = world_tmp / "site.toml"
    site.write_text(f'allowed_bind_sources = ["{allowed}"]\nlock = ["allowed_bind_sources"]\n')
    os.chmod(site, 0o644)
    env = {"MESOBOX_SITE_CONFIG": str(site)}
    for opts in (["-v", f"{outside}:/x"], ["--mount", f"type=bind,source={outside},target=/x"],
                 ["--home", f"{outside}:/home/me"]):
        proc = mesobox("exec", "--no-home", "--no-mount", "tmp", *opts, str(rootfs), "true", as_user=user,
                       cwd=allowed, env=env)
        assert proc.returncode == 13, (opts, proc.stderr)
        assert "is outside the allowed bind sources" in one_error_line(proc.stderr), opts
    out = _sh(mesobox, user, rootfs, "--no-home", "--no-mount", "tmp", "-v", f"{allowed}:/x", script="cat /x/f",
              cwd=allowed, env=env)
    assert out == ["allowed"]


def test_the_spec_carries_ulimits_and_dns_across_config_json() -> None:
    """--ulimit is the OCI ``process.rlimits``, --dns a typed Settings field with its
    annotation: both survive a bundle's config.json, and validate() checks them."""
    from mesobox.errors import UsageError
    from mesobox.launch.specbuild import parse_ulimits
    from mesobox.oci import spec as S

    rlimits = parse_ulimits(("nofile=100:200", "core=0", "stack=-1", "nofile=300"))
    assert rlimits == (("RLIMIT_NOFILE", 300, 300), ("RLIMIT_CORE", 0, 0),
                       ("RLIMIT_STACK", S.RLIM_INFINITY, S.RLIM_INFINITY))
    spec = S.Spec(process=S.Process(args=("true",), env=(), cwd="/", user=S.User(uid=0, gid=0), rlimits=rlimits),
                  root=S.Root(path="/r"), linux=S.Linux(), mesobox=S.Settings(dns=("192.0.2.1", "2001:db8::1")))
    doc = S.to_oci_json(spec)
    assert doc["process"]["rlimits"][0] == {"type": "RLIMIT_NOFILE", "soft": 300, "hard": 300}
    assert doc["annotations"][S.ANN_DNS] == "192.0.2.1,2001:db8::1"
    back = S.from_oci_json(doc)
    assert back == spec
    back.validate()
    for bad in (spec.replace(process=spec.process.replace(rlimits=(("RLIMIT_NOFILE", 5, 4),))),
                spec.replace(process=spec.process.replace(rlimits=(("RLIMIT_BOGUS", 1, 1),))),
                spec.replace(mesobox=S.Settings(dns=("1.1.1.1\nnameserver 6.6.6.6",)))):
        with pytest.raises(UsageError):
            bad.validate()
