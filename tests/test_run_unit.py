"""Pure unit tier of the runtime: option parser, bind specs, environment merge, spec
model and its OCI config.json round trip, command selection."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import SRC
from mesobox.cli.run import parse
from mesobox.errors import PolicyError, UsageError
from mesobox.launch import environ
from mesobox.launch.identity import group_text, passwd_text, subid_range
from mesobox.launch.specbuild import RunOptions, command, parse_bind
from mesobox.oci.spec import IdMap, Linux, Mount, Process, Root, Settings, Spec, User, from_oci_json, to_oci_json
from mesobox.sizes import parse_size


def test_parser_forms_and_stop_at_image() -> None:
    v = parse("run", ["-B/a", "--bind=/b:/c:ro", "--bind", "/d", "-e", "A=1", "--cleanenv", "--writable-tmpfs",
                      "IMG", "-B", "--not-an-option"])
    assert v["binds"] == ("/a", "/b:/c:ro", "/d") and v["env"] == ("A=1",) and v["cleanenv"] is True
    assert v["writable_tmpfs"] == "" and v["image"] == "IMG" and v["args"] == ("-B", "--not-an-option")
    assert parse("exec", ["--", "-weird-image", "cmd"])["image"] == "-weird-image"
    assert parse("run", ["--writable-tmpfs=64m", "I"])["writable_tmpfs"] == "64m"
    assert parse("run", ["-h"]) == {"help": True}
    for bad in (["--bind"], ["--frob", "I"], ["--pid=1", "I"], []):
        with pytest.raises(UsageError):
            parse("run", bad)


def test_parse_bind_and_size() -> None:
    assert parse_bind("/a") == [("/a", "/a", False)]
    assert parse_bind("/a:/b:ro,/c::rw") == [("/a", "/b", True), ("/c", "/c", False)]
    for bad in ("", "/a:/b:rx", "/a:b", "/a:/", "/a:/x/../y", "/a:/b:ro:x"):
        with pytest.raises(UsageError):
            parse_bind(bad)
    assert parse_size("1m", "x") == 1 << 20 and parse_size("2G", "x") == 2 << 30 and parse_size("10", "x") == 10
    with pytest.raises(UsageError):
        parse_size("lots", "x")


@given(st.lists(st.text(alphabet="abc/.", min_size=1, max_size=12), min_size=1, max_size=3))
def test_parse_bind_destinations_are_absolute_and_clean(parts: list[str]) -> None:
    try:
        binds = parse_bind(":".join(["/src", *parts[:1]]))
    except UsageError:
        return
    for _src, dst, _ro in binds:
        assert dst.startswith("/") and ".." not in dst.split("/") and dst != "/"


def test_allowed_bind_sources_resolve_symlinks(tmp_path: os.PathLike[str]) -> None:
    from mesobox.launch.binds import check_source

    allowed = os.path.join(tmp_path, "scratch")
    os.mkdir(allowed)
    os.symlink("/etc", os.path.join(allowed, "escape"))
    assert check_source(allowed, (allowed,)) == os.path.realpath(allowed)
    with pytest.raises(PolicyError):
        check_source(os.path.join(allowed, "escape"), (allowed,))


def test_environment_merge_precedence(tmp_path: os.PathLike[str]) -> None:
    host = {"HOME": "/h", "PATH": "/host", "KEEP": "1", "LD_PRELOAD": "evil.so", "TERM": "xterm"}
    env = dict(e.split("=", 1) for e in environ.merge(host, ["PATH=/img", "IMG=1"], False, [("IMG", "2")], "/x"))
    assert env == {"HOME": "/h", "PATH": "/img", "KEEP": "1", "TERM": "xterm", "IMG": "2"}
    clean = dict(e.split("=", 1) for e in environ.merge(host, [], True, [], "/x"))
    assert clean == {"HOME": "/h", "TERM": "xterm", "PATH": environ.DEFAULT_PATH}
    path = os.path.join(tmp_path, "envfile")
    with open(path, "w") as f:
        f.write("A=1\n# c\n\nB=x=y\n")
    assert environ.read_env_file(path) == [("A", "1"), ("B", "x=y")]
    with open(path, "w") as f:
        f.write("novalue\n")
    with pytest.raises(UsageError):
        environ.read_env_file(path)
    assert environ.parse_env_option("K", {"K": "v"}) == ("K", "v")
    assert environ.parse_env_option("K", {}) is None


def test_command_selection_docker_semantics() -> None:
    cfg = {"Entrypoint": ["/e"], "Cmd": ["c"]}
    run = RunOptions(mode="run", image="i")
    assert command(run, cfg, False) == ("/e", "c")
    assert command(run.replace(args=("a",)), cfg, False) == ("/e", "a")
    assert command(run.replace(entrypoint="/x"), cfg, False) == ("/x",)
    assert command(run, {}, False) == ("/bin/sh",)  # a plain directory image
    assert command(RunOptions(mode="shell", image="i"), {}, True) == ("/bin/bash",)
    with pytest.raises(UsageError):
        command(RunOptions(mode="exec", image="i"), cfg, False)
    with pytest.raises(UsageError):
        command(run.replace(entrypoint=""), {"Env": ["A=1"]}, False)


def _spec() -> Spec:
    return Spec(
        process=Process(args=("/bin/true",), env=("A=1",), cwd="/", user=User(uid=1, gid=2, additional_gids=(3,))),
        root=Root(path="/img"), mounts=(Mount(destination="/d", type="bind", source="/s", options=("rbind", "ro")),),
        hostname="h", linux=Linux(namespaces=("user", "mount", "uts"),
                                  uid_mappings=(IdMap(container_id=0, host_id=1000, size=1),)),
        mesobox=Settings(root_format="squashfs", writable_tmpfs=0, net="slirp", publish=((8080, 80),),
                         subids=True, user_name="alice", home="/home/alice"),
        annotations={"org.example.kept": "yes"})


def test_spec_oci_round_trip_and_validation() -> None:
    spec = _spec()
    spec.validate()
    assert from_oci_json(to_oci_json(spec)) == spec
    # mesobox's typed settings cross the JSON boundary as annotations, beside the others
    written = to_oci_json(spec)["annotations"]
    assert written["org.example.kept"] == "yes" and written["org.mesobox.publish"] == "8080:80"
    assert written["org.mesobox.net"] == "slirp" and written["org.mesobox.writable-tmpfs"] == "0"
    with pytest.raises(AttributeError):
        spec.hostname = "x"  # type: ignore[misc]
    bad = [spec.replace(hostname="h", linux=Linux()), spec.replace(root=Root(path="rel")),
           spec.replace(mounts=(Mount(destination="/a/../b", type="tmpfs", source="t"),)),
           spec.replace(process=spec.process.replace(args=())),
           spec.replace(mesobox=spec.mesobox.replace(net="host")),  # -p needs slirp
           spec.replace(mesobox=spec.mesobox.replace(root_format="tarball")),
           spec.replace(linux=spec.linux.replace(uid_mappings=(IdMap(container_id=0, host_id=1, size=5),
                                                               IdMap(container_id=3, host_id=9, size=1))))]
    for item in bad:
        with pytest.raises(UsageError):
            item.validate()
    with pytest.raises(UsageError):
        from_oci_json({"process": {}})


def test_identity_files_and_subids(tmp_path: os.PathLike[str]) -> None:
    image = "root:x:0:0:root:/root:/bin/sh\nold:x:1000:1000::/home/old:/bin/sh\n"
    out = passwd_text(image, "alice", 1000, 1000, "/home/alice", "/bin/bash").splitlines()
    assert out == ["root:x:0:0:root:/root:/bin/sh", "alice:x:1000:1000:alice:/home/alice:/bin/bash"]
    assert passwd_text(image, "alice", 0, 0, "/h", "/bin/sh") == image
    assert group_text("root:x:0:\n", "alice", 1000, "alice") == "root:x:0:\nalice:x:1000:alice\n"
    path = os.path.join(tmp_path, "subuid")
    with open(path, "w") as f:
        f.write("bob:1:2\nalice:100000:65536\n")
    assert subid_range("alice", 1000, path) == (100000, 65536)
    assert subid_range("carol", 1001, path) is None


def test_run_import_cost_stays_small() -> None:
    """The hot path imports no argparse, json, dataclasses or HTTP code."""
    code = ("import sys; import mesobox.cli.run, mesobox.launch.launcher, mesobox.launch.specbuild, "
            "mesobox.launch.mountplan, mesobox.launch.mountops, mesobox.launch.identity, mesobox.launch.environ, "
            "mesobox.launch.program, mesobox.launch.signals, "
            "mesobox.oci.spec, "
            "mesobox.launch.plancache, mesobox.launch.probe, mesobox.launch.execute; "
            "bad = [m for m in ('argparse', 'json', 'dataclasses', 'http.client', 'urllib.request', 'typing', "
            "'collections') "
            "if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(SRC)!r}); {code}"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out


def _shm_spec(tmp_path: os.PathLike[str], **options: object) -> Spec:
    from mesobox.config import Config
    from mesobox.launch.specbuild import make_spec, path_image

    image = os.path.join(tmp_path, "rootfs")
    os.makedirs(image, exist_ok=True)
    opts = RunOptions(mode="exec", image=image, args=("true",), host_root=os.getuid() == 0, **options)
    return make_spec(opts, Config(), path_image(image))


def _shm_mounts(spec: Spec) -> list[tuple[str, str]]:
    return [(m.type, m.source) for m in spec.mounts if m.destination == "/dev/shm"]


def test_dev_shm_is_the_hosts_by_default_with_mpi_defaults(tmp_path: os.PathLike[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Ranks of a node (one container each) share the host's /dev/shm, and MPI is told not to
    use CMA across their user namespaces; --contain keeps a private tmpfs and sets nothing."""
    from mesobox.launch.specbuild import MPI_SHM_DEFAULTS

    for key, _value in MPI_SHM_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    wanted = {f"{key}={value}" for key, value in MPI_SHM_DEFAULTS}
    spec = _shm_spec(tmp_path)
    assert _shm_mounts(spec) == [("bind", os.path.realpath("/dev/shm"))]
    shm = next(m for m in spec.mounts if m.destination == "/dev/shm")
    assert {"nosuid", "nodev"} <= set(shm.options)
    assert wanted <= set(spec.process.env)
    assert wanted <= set(_shm_spec(tmp_path, cleanenv=True).process.env)

    contained = _shm_spec(tmp_path, contain=True)
    assert _shm_mounts(contained) == [("tmpfs", "shm")]
    assert not {e for e in contained.process.env if e.split("=", 1)[0] in dict(MPI_SHM_DEFAULTS)}
    # --contain with an explicit bind (what `mesobox srun` tasks add): shared, so the defaults.
    bound = _shm_spec(tmp_path, contain=True, binds=("/dev/shm",))
    assert _shm_mounts(bound) == [("tmpfs", "shm"), ("bind", os.path.realpath("/dev/shm"))]
    assert wanted <= set(bound.process.env)
    # Without --contain a -B of /dev/shm is the only mount there (no second bind).
    assert _shm_mounts(_shm_spec(tmp_path, binds=("/dev/shm",))) == [("tmpfs", "shm"),
                                                                      ("bind", os.path.realpath("/dev/shm"))]


def test_mpi_defaults_never_override_the_users_values(tmp_path: os.PathLike[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mesobox.launch.specbuild import MPI_SHM_DEFAULTS

    for key, _value in MPI_SHM_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMPI_MCA_smsc", "xpmem")  # the host's value, passed through
    env_file = os.path.join(tmp_path, "env")
    with open(env_file, "w") as f:
        f.write("MPIR_CVAR_CH4_CMA_ENABLE=1\n")
    spec = _shm_spec(tmp_path, env=("OMPI_MCA_btl_vader_single_copy_mechanism=cma",), env_files=(env_file,))
    env = dict(e.split("=", 1) for e in spec.process.env)
    assert env["OMPI_MCA_smsc"] == "xpmem"
    assert env["MPIR_CVAR_CH4_CMA_ENABLE"] == "1"
    assert env["OMPI_MCA_btl_vader_single_copy_mechanism"] == "cma"
    # --cleanenv drops the host's value: then the default applies.
    clean = dict(e.split("=", 1) for e in _shm_spec(tmp_path, cleanenv=True).process.env)
    assert clean["OMPI_MCA_smsc"] == "^cma"


def test_parse_device() -> None:
    """Docker's --device HOST[:CONTAINER][:PERMS]; PERMS must allow what a bind can give."""
    from mesobox.launch.specbuild import parse_device

    assert parse_device("/dev/x") == ("/dev/x", "/dev/x")
    assert parse_device("/dev/x:/dev/y") == ("/dev/x", "/dev/y")
    assert parse_device("/dev/x:rw") == ("/dev/x", "/dev/x")  # HOST:PERMS, as in Docker
    assert parse_device("/dev/x:/dev/y:mwr") == ("/dev/x", "/dev/y")
    assert parse_device("/dev/x::rwm") == ("/dev/x", "/dev/x")
    assert parse_device("/dev/x:/a//b/") == ("/dev/x", "/a/b")
    for bad in ("", ":/dev/y", "/dev/x:dev/y", "/dev/x:/", "/dev/x:/a/../b", "/dev/x:/dev/y:r", "/dev/x:/dev/y:w",
                "/dev/x:/dev/y:rwx", "/dev/x:/dev/y:rrw", "/dev/x:/dev/y:", "/dev/x:/dev/y:rw:z"):
        with pytest.raises(UsageError):
            parse_device(bad)
    assert parse("exec", ["--device", "/dev/a", "--device=/dev/b:/c", "I", "cmd"])["devices"] == ("/dev/a", "/dev/b:/c")
