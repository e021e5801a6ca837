"""`mesobox build` as an ordinary user: a Dockerfile → an image in the store that
`mesobox run`, `images`, `inspect` and `export` treat as a pulled one.

The base image is made by umoci from busybox and served by the local docker-registry;
RUN steps run in real user namespaces with the test user's sub-id range (newuidmap).
Layers are read back with tarfile and unpacked by umoci, an independent tool.  The
Debian test debootstraps Debian 12 and apt-get installs a package from Debian's own
archive (marked slow; it needs deb.debian.org)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from conftest import Mesobox, Registry, User, make_busybox_rootfs, make_oci_image, need_tool

pytestmark = [pytest.mark.userns, pytest.mark.registry]


def _base_layer(rootfs: Path) -> None:
    make_busybox_rootfs(rootfs)
    (rootfs / "srv" / "old").mkdir(parents=True)
    (rootfs / "srv" / "old" / "file").write_text("old\n")
    (rootfs / "srv" / "keep").write_text("keep\n")
    with open(rootfs / "etc" / "passwd", "a") as f:
        f.write("app:x:1000:1000::/home/app:/bin/sh\n")
    with open(rootfs / "etc" / "group", "a") as f:
        f.write("app:x:1000:\n")


@pytest.fixture(scope="module")
def base(registry: Registry, shared_tmp: Path) -> str:
    """host:port/build-base:v1 — busybox, an app user, /srv/old/file to delete."""
    layout = shared_tmp / "build-base"
    if not (layout / "index.json").exists():
        make_oci_image(layout, "v1", [_base_layer], ["--config.cmd=/bin/sh", "--config.env=PATH=/bin:/usr/bin"])
    return registry.push_oci(layout, "v1", "build-base")


def _context(root: Path, user: User, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(root)], check=True)
    return root


def _build(mesobox: Mesobox, user: User, ctx: Path, tag: str, *extra: str,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return mesobox("build", "-t", tag, *extra, str(ctx), as_user=user, env=env, timeout=600)


def _ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def _inspect(mesobox: Mesobox, user: User, tag: str) -> dict[str, object]:
    data = json.loads(_ok(mesobox("inspect", tag, as_user=user)))
    assert isinstance(data, dict)
    return data


def _layer_members(mesobox: Mesobox, user: User, digest: str) -> dict[str, tarfile.TarInfo]:
    blob = mesobox.store_root / user.name / "blobs" / "sha256" / digest.split(":")[1]
    with tarfile.open(blob) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_build_then_run(mesobox: Mesobox, user: User, base: str, world_tmp: Path) -> None:
    """RUN/COPY/ENV/WORKDIR/USER/ENTRYPOINT/CMD and the recorded-only instructions; the
    image runs, lists and inspects like a pulled one (default format: squashfs)."""
    ctx = _context(world_tmp / "ctx", user, {
        "hello.txt": "from the context\n",
        "Dockerfile": (
            f"FROM {base}\n"
            'ENV GREETING="hello world" \\\n'
            "    OTHER=x\n"
            "WORKDIR /app\n"
            "COPY hello.txt ./\n"
            "RUN echo \"$GREETING\" > out.txt && id -u > built-as.txt && chown app:app out.txt\n"
            "USER app\n"
            "LABEL org.example.kind=test \"second label\"=two\n"
            "EXPOSE 8080 53/udp\n"
            "VOLUME /data\n"
            "STOPSIGNAL SIGINT\n"
            "HEALTHCHECK --interval=30s --retries=3 CMD test -f /app/out.txt\n"
            'ENTRYPOINT ["/bin/sh", "-c"]\n'
            'CMD ["cat out.txt hello.txt built-as.txt; pwd; id -u; stat -c %u out.txt"]\n'),
    })
    digest = _ok(_build(mesobox, user, ctx, "built:1")).strip()
    assert digest.startswith("sha256:")
    out = _ok(mesobox("run", "--fakeroot", "--contain", "built:1", as_user=user)).splitlines()
    assert out == ["hello world", "from the context", "0", "/app", "1000", "1000"]
    listed = _ok(mesobox("images", as_user=user))
    assert "built:1" in listed and digest[7:19] in listed
    info = _inspect(mesobox, user, "built:1")
    assert info["Digest"] == digest and info["User"] == "app" and info["WorkingDir"] == "/app"
    assert info["Entrypoint"] == ["/bin/sh", "-c"]
    assert "GREETING=hello world" in info["Env"] and "OTHER=x" in info["Env"]  # type: ignore[operator]
    assert info["Labels"] == {"org.example.kind": "test", "second label": "two"}
    assert info["Squashfs"]
    blobs = mesobox.store_root / user.name / "blobs" / "sha256"
    manifest = json.loads((blobs / digest.split(":")[1]).read_text())
    config = json.loads((blobs / manifest["config"]["digest"].split(":")[1]).read_text())
    assert config["config"]["ExposedPorts"] == {"8080/tcp": {}, "53/udp": {}}
    assert config["config"]["Volumes"] == {"/data": {}}
    assert config["config"]["StopSignal"] == "SIGINT"
    assert config["config"]["Healthcheck"] == {"Test": ["CMD-SHELL", "test -f /app/out.txt"],
                                               "Interval": 30 * 10**9, "Retries": 3}
    assert len(config["rootfs"]["diff_ids"]) == len(manifest["layers"]) == 4  # base, WORKDIR, COPY, RUN
    assert manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"


def test_rebuild_is_cached_at_every_step(mesobox: Mesobox, user: User, base: str, world_tmp: Path) -> None:
    ctx = _context(world_tmp / "ctx", user, {
        "a.txt": "a\n", "b.txt": "b\n",
        "Dockerfile": f"FROM {base}\nRUN echo one > /one\nCOPY a.txt /a.txt\nWORKDIR /w\nRUN date +%N > /w/t\n"
                      "COPY b.txt /b.txt\nCMD [\"cat\", \"/w/t\"]\n",
    })
    first = _build(mesobox, user, ctx, "cached:1", "--format", "dir")
    assert b"CACHED" not in first.stderr, first.stderr.decode()
    digest = _ok(first).strip()
    again = _build(mesobox, user, ctx, "cached:1", "--format", "dir")
    assert _ok(again).strip() == digest  # the same layers, config and manifest
    lines = again.stderr.decode().splitlines()
    steps = [i for i, line in enumerate(lines) if line.startswith("STEP ")]
    layer_steps = [i for i in steps if lines[i].split(": ", 1)[1].split()[0] in ("RUN", "COPY", "WORKDIR")]
    assert len(layer_steps) == 5
    assert all(lines[i + 1] == "--> CACHED" for i in layer_steps), lines
    # A changed input: its step and every later one run again; earlier ones stay cached.
    (ctx / "a.txt").write_text("changed\n")
    third = _build(mesobox, user, ctx, "cached:1", "--format", "dir")
    assert _ok(third).strip() != digest
    lines = third.stderr.decode().splitlines()
    cached = [lines[i].split(": ", 1)[1] for i, line in enumerate(lines[:-1]) if lines[i + 1] == "--> CACHED"]
    assert cached == ["RUN echo one > /one"]
    # --no-cache runs everything again.
    fourth = _build(mesobox, user, ctx, "cached:1", "--format", "dir", "--no-cache")
    assert b"CACHED" not in _ok(fourth).encode() + fourth.stderr


def test_multi_stage_copy_from_and_target(mesobox: Mesobox, user: User, base: str, world_tmp: Path) -> None:
    ctx = _context(world_tmp / "ctx", user, {
        "Dockerfile": (
            f"FROM {base} AS builder\n"
            "RUN mkdir -p /out/sub && echo built > /out/sub/tool && chmod 0750 /out/sub/tool "
            "&& chown 1000:1000 /out/sub/tool && echo unused > /out/junk\n"
            f"FROM {base} AS unused\n"
            "RUN exit 1\n"
            "FROM scratch\n"
            "COPY --from=builder /bin/busybox /bin/\n"
            "COPY --from=builder /out/sub /opt/\n"
            "COPY --from=0 --chown=7:8 /out/junk /junk\n"
            'CMD ["/bin/busybox", "sh", "-c", "cat /opt/tool; stat -c %u:%g:%a /opt/tool /junk; ls /"]\n'),
    })
    _ok(_build(mesobox, user, ctx, "multi:1", "--format", "dir"))  # the failing stage is never built
    out = _ok(mesobox("run", "--fakeroot", "multi:1", as_user=user)).splitlines()
    assert out[0] == "built" and out[1].endswith(":750") and out[2].endswith(":644")
    assert "out" not in out[3:] and "opt" in out[3:]
    # Owners are the layers' business (a rootless store's flattened tree is all the caller's):
    # --from keeps the source's, --chown sets its own.
    layers = _inspect(mesobox, user, "multi:1")["Layers"]
    assert isinstance(layers, list) and len(layers) == 3  # FROM scratch: no base layer
    tool, junk = _layer_members(mesobox, user, layers[1])["opt/tool"], _layer_members(mesobox, user, layers[2])["junk"]
    assert (tool.uid, tool.gid, tool.mode) == (1000, 1000, 0o750)
    assert (junk.uid, junk.gid) == (7, 8)
    target = _build(mesobox, user, ctx, "multi:builder", "--format", "dir", "--target", "builder")
    _ok(target)
    assert "STEP 2/2: RUN" in target.stderr.decode()  # only the builder stage
    shown = _ok(mesobox("run", "multi:builder", "cat", "/out/junk", as_user=user))
    assert shown == "unused\n"
    bad = _build(mesobox, user, ctx, "multi:x", "--target", "nosuch")
    assert bad.returncode == 2 and b"--target nosuch" in bad.stderr


def test_built_image_pushed_checked_by_skopeo_and_umoci_run_by_another_user(
        mesobox: Mesobox, user: User, attacker: User, base: str, registry: Registry, world_tmp: Path) -> None:
    """Build (two stages) → push → independent clients see it → a second user pulls it and runs it."""
    ctx = _context(world_tmp / "ctx", user, {
        "Dockerfile": (
            f"FROM {base} AS builder\n"
            "RUN mkdir -p /out && echo made-by-build > /out/result\n"
            f"FROM {base}\n"
            "COPY --from=builder /out/result /opt/result\n"
            'CMD ["cat", "/opt/result"]\n'),
    })
    _ok(_build(mesobox, user, ctx, "shipped:1"))
    ref = f"{registry.host}/built/shipped:1"
    pushed = _ok(mesobox("push", "shipped:1", f"docker://{ref}", as_user=user)).split()[-1]
    assert pushed == _inspect(mesobox, user, "shipped:1")["Digest"]
    seen = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{ref}"],
                                     capture_output=True, check=True).stdout)
    assert seen["Digest"] == pushed
    layout, bundle = world_tmp / "copied", world_tmp / "bundle"
    subprocess.run(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://{ref}", f"oci:{layout}:v1"],
                   check=True, capture_output=True)
    subprocess.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:v1", str(bundle)], check=True,
                   capture_output=True)
    assert (bundle / "rootfs" / "opt" / "result").read_text() == "made-by-build\n"
    assert _ok(mesobox("pull", "-q", ref, as_user=attacker)).strip() == pushed
    assert _ok(mesobox("run", ref, as_user=attacker)) == "made-by-build\n"


def test_exec_form_shell_and_a_stage_as_base(mesobox: Mesobox, user: User, base: str, world_tmp: Path) -> None:
    ctx = _context(world_tmp / "ctx", user, {
        "Dockerfile": (
            f"FROM {base} AS one\n"
            'SHELL ["/bin/sh", "-c", "echo via-shell > /shell.txt; eval \\"$0\\""]\n'
            "RUN echo shell-form > /hi.txt\n"
            'RUN ["/bin/sh", "-c", "echo exec-form > /exec.txt"]\n'
            "FROM one\n"
            "RUN cat /shell.txt /hi.txt /exec.txt > /both\n"),
    })
    _ok(_build(mesobox, user, ctx, "forms:1", "--format", "dir"))
    assert _ok(mesobox("run", "forms:1", "cat", "/both", as_user=user)) == "via-shell\nshell-form\nexec-form\n"
    info = _inspect(mesobox, user, "forms:1")
    assert isinstance(info["Layers"], list) and len(info["Layers"]) == 4  # base + 2 of one + 1


def test_source_date_epoch_makes_builds_reproducible(mesobox: Mesobox, user: User, base: str,
                                                     world_tmp: Path) -> None:
    """Two builds that run every step again give the same bytes: sorted entries, times
    clamped to SOURCE_DATE_EPOCH, gzip without a date, config dated by it too."""
    ctx = _context(world_tmp / "ctx", user, {
        "f.txt": "content\n",
        "Dockerfile": f"FROM {base}\nCOPY f.txt /f.txt\nRUN mkdir -p /a/b && echo x > /a/b/c && rm /srv/keep\n",
    })
    env = {"SOURCE_DATE_EPOCH": "1700000000"}
    first = _ok(_build(mesobox, user, ctx, "repro:1", "--format", "dir", "--no-cache", env=env)).strip()
    second = _ok(_build(mesobox, user, ctx, "repro:2", "--format", "dir", "--no-cache", env=env)).strip()
    assert first == second
    layers = _inspect(mesobox, user, "repro:1")["Layers"]
    assert isinstance(layers, list)
    assert {m.mtime for m in _layer_members(mesobox, user, layers[-1]).values()} <= {1700000000}


def test_dockerignore_and_globs(mesobox: Mesobox, user: User, base: str, world_tmp: Path) -> None:
    ctx = _context(world_tmp / "ctx", user, {
        ".dockerignore": "# secrets stay home\nsecret.txt\n*.log\n!keep.log\nbuild/\n",
        "secret.txt": "s", "a.log": "a", "keep.log": "k", "build/out.o": "o", "src/main.c": "c",
        "x1.conf": "1", "x2.conf": "2",
        "Dockerfile": f"FROM {base}\nCOPY . /ctx/\nCOPY x*.conf /etc/confs/\n",
    })
    _ok(_build(mesobox, user, ctx, "ignore:1", "--format", "dir"))
    found = _ok(mesobox("run", "ignore:1", "sh", "-c", "cd /ctx && find . | sort; ls /etc/confs", as_user=user))
    assert found.split() == [".", "./.dockerignore", "./Dockerfile", "./keep.log", "./src", "./src/main.c",
                             "./x1.conf", "./x2.conf", "x1.conf", "x2.conf"]
    (ctx / "Dockerfile").write_text(f"FROM {base}\nCOPY secret.txt /\n")
    refused = _build(mesobox, user, ctx, "ignore:2")
    assert refused.returncode != 0
    assert refused.stderr.decode().splitlines()[-1].startswith("mesobox: error: ") or \
        b"excluded by .dockerignore" in refused.stderr
    assert b"Dockerfile:2: " in refused.stderr and b"excluded by .dockerignore" in refused.stderr


def test_build_args(mesobox: Mesobox, user: User, base: str, world_tmp: Path) -> None:
    host, _, rest = base.partition("/")
    ctx = _context(world_tmp / "ctx", user, {
        "Dockerfile": (
            f"ARG REGISTRY={host}\n"
            "ARG NAME\n"
            "FROM ${REGISTRY}/${NAME:-nothing}\n"
            "ARG VERSION=1.0\n"
            "ARG REGISTRY\n"
            "ENV SHOWN=v${VERSION}\n"
            'RUN echo "$VERSION $SHOWN ${REGISTRY:+has-registry} ${UNSET:-dflt}" > /args\n'),
    })
    proc = _build(mesobox, user, ctx, "args:1", "--format", "dir", "--build-arg", f"NAME={rest}",
                  "--build-arg", "VERSION=2.5", "--build-arg", "NEVER=1")
    _ok(proc)
    assert b"NEVER" in proc.stderr  # an argument no ARG declares is reported
    assert _ok(mesobox("run", "args:1", "cat", "/args", as_user=user)) == "2.5 v2.5 has-registry dflt\n"
    assert "SHOWN=v2.5" in _inspect(mesobox, user, "args:1")["Env"]  # type: ignore[operator]
    # ARG values are not in the image's Env
    assert not any(str(e).startswith("VERSION=") for e in _inspect(mesobox, user, "args:1")["Env"])  # type: ignore[attr-defined]


def test_whiteouts_and_subid_owners_in_layers(mesobox: Mesobox, user: User, base: str, world_tmp: Path) -> None:
    """A deletion is an OCI whiteout; a file chowned to a sub-id inside RUN says the
    container id in its layer (on the host it belonged to sub-id base + N - 1);
    umoci, an independent tool, unpacks the exported image the same way."""
    need_tool("umoci")
    ctx = _context(world_tmp / "ctx", user, {
        "Dockerfile": (f"FROM {base}\n"
                       "RUN rm -r /srv/old && mkdir /owned && echo x > /owned/f && chown -R 100:101 /owned "
                       "&& chown 4242:4343 /srv/keep\n"),
    })
    _ok(_build(mesobox, user, ctx, "wh:1", "--format", "dir"))
    layers = _inspect(mesobox, user, "wh:1")["Layers"]
    assert isinstance(layers, list)
    members = _layer_members(mesobox, user, layers[-1])
    assert "srv/.wh.old" in members and members["srv/.wh.old"].size == 0
    assert "srv/old/file" not in members and "srv/old" not in members
    assert (members["owned"].uid, members["owned"].gid) == (100, 101)
    assert (members["owned/f"].uid, members["owned/f"].gid) == (100, 101)
    assert (members["srv/keep"].uid, members["srv/keep"].gid) == (4242, 4343)
    assert members["owned/f"].uname == "" and sorted(members) == list(members)
    out = world_tmp / "layout"
    _ok(mesobox("export", "--format", "oci", "-o", str(out), "wh:1", as_user=user))
    bundle = world_tmp / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{out}:1", str(bundle)], check=True, capture_output=True)
    rootfs = bundle / "rootfs"
    assert not (rootfs / "srv" / "old").exists() and (rootfs / "srv" / "keep").exists()
    assert (os.stat(rootfs / "owned" / "f").st_uid, os.stat(rootfs / "owned" / "f").st_gid) == (100, 101)


def test_add_extracts_archives(mesobox: Mesobox, user: User, base: str, world_tmp: Path) -> None:
    src = world_tmp / "tree"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "data").write_text("inside the archive\n")
    ctx = _context(world_tmp / "ctx", user, {
        "plain.txt": "plain\n",
        "Dockerfile": f"FROM {base}\nADD archive.tar.gz /opt/\nADD --chmod=0600 plain.txt /opt/plain\n"
                      "ADD archive.tar.xz /xz\n",
    })
    with tarfile.open(ctx / "archive.tar.gz", "w:gz") as tar:
        tar.add(src / "pkg", arcname="pkg")
    with tarfile.open(ctx / "archive.tar.xz", "w:xz") as tar:
        tar.add(src / "pkg", arcname="pkg")
    subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(ctx)], check=True)
    _ok(_build(mesobox, user, ctx, "add:1", "--format", "dir"))
    out = _ok(mesobox("run", "add:1", "sh", "-c", "cat /opt/pkg/data /xz/pkg/data; stat -c %a /opt/plain; "
                                                   "ls /opt", as_user=user))
    assert out.split("\n") == ["inside the archive", "inside the archive", "600", "pkg", "plain", ""]


@pytest.mark.parametrize(("dockerfile", "code", "expect"), [
    ("FROM {base}\nRUN true\nRUN echo failing; exit 3\n", 1, "Dockerfile:3: RUN failed with exit status 3"),
    ("FROM {base}\n\nBOGUS x\n", 2, "Dockerfile:3: unknown instruction 'BOGUS'"),
    ("FROM {base}\nCOPY nothere /x\n", 2, "Dockerfile:2: 'nothere' is not in the build context"),
    ("FROM {base}\nCOPY --from=nostage /a /b\n", 2, "Dockerfile:2: COPY --from=nostage: no earlier stage"),
    ("FROM {base}\nUSER a b\n", 2, "Dockerfile:2: USER takes one value"),
    ("FROM {base}\nEXPOSE 99999\n", 2, "Dockerfile:2: EXPOSE: port out of range"),
    ("FROM {base}\nENV X=${{Y\n", 2, "Dockerfile:2: missing '}'"),
    ("FROM {base}\nADD http://example.com/x /x\n", 2, "Dockerfile:2: ADD of a URL is not supported"),
    ("FROM {base}\nCOPY --chown=nosuchuser Dockerfile /x\n", 2, "Dockerfile:2: --chown: no user 'nosuchuser'"),
    ("\n# the base\nFROM {base}-missing\n", 4, "Dockerfile:3: "),
])
def test_bad_dockerfile_is_one_line(mesobox: Mesobox, user: User, base: str, world_tmp: Path, dockerfile: str,
                                    code: int, expect: str) -> None:
    ctx = _context(world_tmp / "ctx", user, {"Dockerfile": dockerfile.format(base=base)})
    proc = _build(mesobox, user, ctx, "bad:1", "--format", "dir")
    assert proc.returncode == code, proc.stderr.decode()
    errors = [line for line in proc.stderr.decode().splitlines() if line.startswith("mesobox: error:")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr.decode()
    assert b"Traceback" not in proc.stderr
    assert mesobox("inspect", "bad:1", as_user=user).returncode != 0  # nothing was stored under the name


def test_useradd_and_system_user_files(mesobox: Mesobox, user: User, base: str, world_tmp: Path) -> None:
    """RUN sees the image's own /etc/passwd, writable (not the launch's generated copy),
    and a step may switch to a sub-id user: a later USER step runs as it."""
    ctx = _context(world_tmp / "ctx", user, {
        "Dockerfile": (f"FROM {base}\n"
                       "RUN echo worker:x:1500:1500::/work:/bin/sh >> /etc/passwd "
                       "&& mkdir /work && chown worker /work\n"
                       "USER worker\n"
                       "RUN id -u > /work/who && touch /work/mine\n"),
    })
    _ok(_build(mesobox, user, ctx, "users:1", "--format", "dir"))
    out = _ok(mesobox("run", "users:1", "sh", "-c", "grep ^worker: /etc/passwd; cat /work/who", as_user=user))
    assert out.startswith("worker:x:1500:") and out.endswith("1500\n")
    layers = _inspect(mesobox, user, "users:1")["Layers"]
    assert isinstance(layers, list)
    assert _layer_members(mesobox, user, layers[-1])["work/mine"].uid == 1500


def test_symlinks_planted_by_the_image_are_never_followed_on_the_host(
        mesobox: Mesobox, user: User, registry: Registry, world_tmp: Path) -> None:
    """A hostile base image whose /app and /lnk are symlinks to a directory the builder
    can write on the host: COPY into /app, WORKDIR below it, and a RUN that replaces
    /lnk by a directory all land in the image, never in that host directory."""
    # Not below /tmp: a RUN's /tmp is a private tmpfs, which would hide the path inside.
    target = user.home / f"build-target-{world_tmp.name}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    subprocess.run(["chown", f"{user.uid}:{user.gid}", str(target)], check=True)

    def hostile(rootfs: Path) -> None:
        make_busybox_rootfs(rootfs)
        (rootfs / "app").symlink_to(target)
        (rootfs / "lnk").symlink_to(target)

    layout = make_oci_image(world_tmp / "hostile", "v1", [hostile], ["--config.cmd=/bin/sh"])
    subprocess.run(["chmod", "-R", "a+rX", str(layout)], check=True)
    ref = registry.push_oci(layout, "v1", f"build-hostile-{world_tmp.name.lower()}")
    ctx = _context(world_tmp / "ctx", user, {
        "f.txt": "copied\n",
        "Dockerfile": (f"FROM {ref}\n"
                       "COPY f.txt /app/f.txt\n"
                       "WORKDIR /app/sub\n"
                       "RUN rm /lnk && mkdir /lnk && echo run > /lnk/r\n"),
    })
    _ok(_build(mesobox, user, ctx, "hostile:1", "--format", "dir"))
    assert list(target.iterdir()) == []
    inside = f"{target}/f.txt"
    out = _ok(mesobox("run", "--contain", "hostile:1", "sh", "-c", f"cat {inside} /lnk/r; test -d {target}/sub "
                      "&& echo made", as_user=user))
    assert out == "copied\nrun\nmade\n"
    shutil.rmtree(target)


@pytest.fixture(scope="module")
def no_subid_user() -> User:
    """An ordinary user without a sub-id range (a system account: useradd gives it none)."""
    name = (os.environ.get("MESOBOX_TEST_USER", "mbtest") + "ns")[:32]
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-r", "-m", "-s", "/bin/bash", name], check=True)
        entry = pwd.getpwnam(name)
    for path in ("/etc/subuid", "/etc/subgid"):
        text = Path(path).read_text() if os.path.exists(path) else ""
        if any(line.split(":")[0] in (name, str(entry.pw_uid)) for line in text.splitlines()):
            pytest.skip(f"{name} has a sub-id range in {path}")
    return User(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir))


def test_single_id_mode(mesobox: Mesobox, no_subid_user: User, base: str, world_tmp: Path) -> None:
    ctx = _context(world_tmp / "ctx", no_subid_user, {
        "Dockerfile": f"FROM {base}\nRUN echo ok > /made && id -u >> /made\nCMD [\"cat\", \"/made\"]\n",
    })
    proc = _build(mesobox, no_subid_user, ctx, "single:1", "--format", "dir")
    _ok(proc)
    assert b"no sub-id range" in proc.stderr
    assert _ok(mesobox("run", "single:1", as_user=no_subid_user)) == "ok\n0\n"
    (ctx / "Dockerfile").write_text(f"FROM {base}\nRUN chown 100 /srv/keep\n")
    refused = _build(mesobox, no_subid_user, ctx, "single:2", "--format", "dir")
    assert refused.returncode == 1 and b"Dockerfile:2: RUN failed" in refused.stderr


# --- a real distribution ---------------------------------------------------------------------

DEBIAN_CACHE = Path(os.environ.get("MESOBOX_TEST_CACHE", "/var/tmp/mesobox-test-cache")) / "debian12-minbase"


def _debian_layout() -> Path:
    """An OCI layout of `debootstrap --variant=minbase bookworm` (one layer), made once
    per machine in the test cache."""
    layout = DEBIAN_CACHE / "layout"
    if (layout / "index.json").exists():
        return layout
    need_tool("debootstrap")
    work = DEBIAN_CACHE / "work"
    shutil.rmtree(work, ignore_errors=True)
    rootfs = work / "rootfs"
    rootfs.mkdir(parents=True)
    proc = subprocess.run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
                          capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0:
        pytest.skip(f"debootstrap failed (is deb.debian.org reachable?): {proc.stdout[-300:]}{proc.stderr[-300:]}")
    subprocess.run(["rm", "-rf", str(rootfs / "var/cache/apt/archives"), str(rootfs / "var/lib/apt/lists")],
                   check=True)
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
    (rootfs / "var/cache/apt/archives/partial").mkdir(parents=True)
    subprocess.run(["chown", "_apt:root", str(rootfs / "var/lib/apt/lists/partial"),
                    str(rootfs / "var/cache/apt/archives/partial")], check=False)
    import hashlib
    import json as _json

    layer = work / "layer.tar.gz"
    subprocess.run(["tar", "--numeric-owner", "--sort=name", "-C", str(rootfs), "-czf", str(layer), "."], check=True)
    raw = subprocess.run(["gzip", "-dc", str(layer)], capture_output=True, check=True).stdout
    diff_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    blobs = work / "layout" / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return "sha256:" + digest, len(data)

    layer_digest, layer_size = put(layer.read_bytes())
    config_digest, config_size = put(_json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], "Cmd": ["bash"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode())
    manifest_digest, manifest_size = put(_json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": layer_size}]}).encode())
    (work / "layout" / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (work / "layout" / "index.json").write_text(_json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size,
        "annotations": {"org.opencontainers.image.ref.name": "bookworm"}}]}))
    subprocess.run(["chmod", "-R", "a+rX", str(work / "layout")], check=True)
    shutil.rmtree(rootfs)
    os.chmod(DEBIAN_CACHE, 0o755)
    os.rename(work / "layout", layout)
    return layout


@pytest.mark.slow
def test_apt_get_install_on_debian(mesobox: Mesobox, user: User, world_tmp: Path) -> None:
    """apt-get update/install from Debian's archive inside RUN, as in Docker: apt drops
    to its _apt user for downloads (a sub-id), dpkg chowns files to system users."""
    layout = _debian_layout()
    ctx = _context(world_tmp / "ctx", user, {
        "Dockerfile": (f"FROM oci:{layout}:bookworm\n"
                       "RUN apt-get update && apt-get install -y --no-install-recommends hello "
                       "&& rm -rf /var/lib/apt/lists/*\n"
                       'CMD ["hello"]\n'),
    })
    proc = _build(mesobox, user, ctx, "debian-hello:1", "--format", "dir")
    _ok(proc)
    assert _ok(mesobox("run", "debian-hello:1", as_user=user)) == "Hello, world!\n"
    layers = _inspect(mesobox, user, "debian-hello:1")["Layers"]
    assert isinstance(layers, list) and len(layers) == 2
    members = _layer_members(mesobox, user, layers[-1])
    assert "usr/bin/hello" in members and members["usr/bin/hello"].uid == 0
    assert "var/lib/dpkg/status" in members
