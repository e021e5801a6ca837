"""The build: stages in order, each instruction a step, the cache consulted at each.

A stage's state is its chain key (cache.py), its layers, the image config it has so far
and, only once a step has to run, its rootfs: the layers extracted into a private work
directory (as root of the build's user namespace, owners kept).  While every step hits
the cache nothing is extracted or run; the first miss extracts, and later hits apply
their cached layer to the rootfs so that it stays the stage's.

Which stages are built: the target (``--target``, else the last) and the stages it
needs (``FROM stage``, ``COPY --from=stage``), in file order.

Progress goes to stderr, one ``STEP n/N: INSTRUCTION`` line per step and ``--> CACHED``
for a layer step the cache answered; the image digest alone goes to stdout.
"""

from __future__ import annotations

import os
import posixpath
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mesobox.config import Config
from mesobox.errors import MesoboxError
from mesobox.files import source_date_epoch
from mesobox.image.build import cache as C
from mesobox.image.build import changes, userns
from mesobox.image.build.context import Context
from mesobox.image.build.dockerfile import Dockerfile, DockerfileError, Instruction, Stage, key_values, words

DEFAULT_SHELL = ["/bin/sh", "-c"]
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LAYER_STEPS = ("RUN", "COPY", "ADD", "WORKDIR")


class BuildError(MesoboxError):
    """A step failed (its command's exit status, a missing source…)."""

    exit_code = 1


@dataclass
class State:
    key: str
    layers: list[dict[str, Any]]  # {"digest", "size", "media_type"}
    diff_ids: list[str]
    history: list[dict[str, Any]]
    config: dict[str, Any]  # the image config's "config" object
    platform: tuple[str, str]  # (os, architecture)
    created: str
    args: dict[str, str] = field(default_factory=dict)  # this stage's ARG values
    rootfs: str | None = None
    cmd_set: bool = False  # CMD given in this stage (ENTRYPOINT keeps it then)


@dataclass
class Options:
    tag: str
    build_args: dict[str, str]
    target: str | None = None
    no_cache: bool = False
    fmt: str = "squashfs"


class Builder:
    def __init__(self, config: Config, df: Dockerfile, context: Context, options: Options) -> None:
        from mesobox.image.store import Store

        self.config = config
        self.df = df
        self.context = context
        self.options = options
        self.store = Store(config)
        self.store.init()
        self.cache = C.Cache(self.store)
        self.maps = userns.Maps()
        self.epoch = source_date_epoch()
        self.states: dict[int, State] = {}
        self.used_args: set[str] = set()
        self.work = ""
        self.global_args = self._global_args()

    # -- the whole build -------------------------------------------------------------------
    def build(self) -> Any:
        if self.maps.single_id:
            sys.stderr.write(userns.SINGLE_ID_NOTE)
        target = self._target()
        needed = self._needed(target)
        from mesobox import paths

        top = paths.runtime_dir(self.config.runtime_dir_str)
        self.work = tempfile.mkdtemp(prefix="build-", dir=top)
        self.step, self.total = 0, sum(len(s.instructions) + 1 for s in self.df.stages if s.index in needed)
        # `mesobox prune` waits: the layers this build stores are in no image record yet.
        with self.store.in_use():
            try:
                for stage in self.df.stages:
                    if stage.index in needed:
                        self.states[stage.index] = self._stage(stage)
                state = self.states[target.index]
                self._warn_unused_args()
                from mesobox.image.build.commit import commit

                return commit(self.config, self.options.tag, self._image_config(state), state.layers,
                              self.options.fmt)
            finally:
                userns.call(self.maps, changes.remove, self.work)

    def _warn_unused_args(self) -> None:
        unused = sorted(set(self.options.build_args) - self.used_args)
        if unused:
            sys.stderr.write(f"mesobox: warning: build arguments never declared with ARG: {', '.join(unused)}\n")

    def _target(self) -> Stage:
        if self.options.target is None:
            return self.df.stages[-1]
        for stage in self.df.stages:
            if stage.name == self.options.target.lower():
                return stage
        names = ", ".join(s.name for s in self.df.stages if s.name) or "none"
        raise DockerfileError(f"--target {self.options.target}: no stage of that name in {self.df.path}",
                              hint=f"named stages: {names}")

    def _needed(self, target: Stage) -> set[int]:
        needed: set[int] = set()
        todo = [target]
        while todo:
            stage = todo.pop()
            if stage.index in needed:
                continue
            needed.add(stage.index)
            base = self._stage_named(self._expand(stage.base, self.global_args), stage.index)
            if base is not None:
                todo.append(base)
            for ins in stage.instructions:
                source = ins.flag("from") if ins.keyword == "COPY" else None
                if source is not None:
                    found = self._stage_named(source, stage.index)
                    if found is None:
                        raise self.df.error(ins.line, f"COPY --from={source[:40]}: no earlier stage of that name "
                                                      "or number", hint="name a stage: FROM IMAGE AS NAME")
                    todo.append(found)
        return needed

    def _stage_named(self, name: str, before: int) -> Stage | None:
        for stage in self.df.stages[:before]:
            if stage.name == name.lower() or str(stage.index) == name:
                return stage
        return None

    def _global_args(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for ins in self.df.global_args:
            for name, default in key_values(ins, values, self.df.escape, self._where(ins)):
                value = self._arg_value(name, None if default == "\0" else default)
                if value is not None:
                    values[name] = value
        return values

    def _arg_value(self, name: str, default: str | None, fallback: str | None = None) -> str | None:
        """--build-arg, else the ARG's default, else the global ARG's value; None: unset."""
        if name in self.options.build_args:
            self.used_args.add(name)
            return self.options.build_args[name]
        return default if default is not None else fallback

    # -- one stage -----------------------------------------------------------------------
    def _stage(self, stage: Stage) -> State:
        base = self._expand(stage.base, self.global_args)
        self._say(f"FROM {base}" + (f" AS {stage.name}" if stage.name else ""))
        try:
            state = self._base_state(base, stage)
        except MesoboxError as err:
            if not err.message.startswith(f"{self.df.path}:"):
                err.message = f"{self.df.path}:{stage.line}: {err.message}"
            raise
        for ins in stage.instructions:
            self._say(ins.text)
            try:
                self._instruction(ins, state)
            except MesoboxError as err:
                if err.message.startswith(f"{self.df.path}:"):
                    raise
                err.message = f"{self._where(ins)}{err.message}"  # which line, for every error of a step
                raise
        return state

    def _base_state(self, base: str, stage: Stage) -> State:
        earlier = self._stage_named(base, stage.index)
        if earlier is not None:
            parent = self.states[earlier.index]
            return State(key=parent.key, layers=list(parent.layers), diff_ids=list(parent.diff_ids),
                         history=list(parent.history), config=dict(parent.config), platform=parent.platform,
                         created=parent.created)
        if base.lower() == "scratch":
            from mesobox.image.source import host_platform

            arch = host_platform().split("/")[1]
            return State(key=C.chain("scratch"), layers=[], diff_ids=[], history=[], config={},
                         platform=("linux", arch), created=self._time(0))
        return self._image_state(base, stage)

    def _image_state(self, base: str, stage: Stage) -> State:
        import json

        from mesobox.image.build.commit import oci_layer_type
        from mesobox.image.store import Store

        record = Store(self.config).lookup(base)
        if record is None:
            from mesobox.image.pull import pull

            record = pull(self.config, base, fmt=self.options.fmt, quiet=True, platform=stage.platform)
        try:
            full = json.loads(self.store.read_blob(record.config_digest))
        except (ValueError, MesoboxError) as err:
            raise BuildError(f"{self.df.path}:{stage.line}: the config of {base} cannot be read: {err}",
                             hint=f"pull it again: mesobox pull {base}") from None
        diff_ids = list((full.get("rootfs") or {}).get("diff_ids") or [])
        layers = [{"digest": layer["digest"], "size": layer["size"],
                   "media_type": oci_layer_type(str(layer.get("media_type", "")))} for layer in record.layers]
        if len(diff_ids) != len(layers):
            raise BuildError(f"{self.df.path}:{stage.line}: {base}: its config lists {len(diff_ids)} layers, "
                             f"its manifest {len(layers)}")
        return State(key=C.chain("image", record.digest), layers=layers, diff_ids=diff_ids,
                     history=list(full.get("history") or []), config=dict(record.config),
                     platform=(str(full.get("os", "linux")), str(full.get("architecture", ""))),
                     created=str(full.get("created") or self._time(0)))

    def _instruction(self, ins: Instruction, state: State) -> None:
        env = self._env(state)
        where = self._where(ins)
        kw = ins.keyword
        if kw == "ARG":
            for name, default in key_values(ins, env, self.df.escape, where):
                value = self._arg_value(name, None if default == "\0" else default, self.global_args.get(name))
                if value is not None:
                    state.args[name] = value
                self._meta(state, ins, f"ARG {name}" if value is None else f"ARG {name}={value}", record=False)
        elif kw == "ENV":
            pairs = key_values(ins, env, self.df.escape, where)
            current = list(state.config.get("Env") or [])
            for name, value in pairs:
                names = [e.partition("=")[0] for e in current]
                if name in names:
                    current[names.index(name)] = f"{name}={value}"  # in place, as Docker does
                else:
                    current.append(f"{name}={value}")
            state.config["Env"] = current
            self._meta(state, ins, "ENV " + " ".join(f"{k}={v}" for k, v in pairs))
        elif kw in ("LABEL", "MAINTAINER"):
            pairs = key_values(ins, env, self.df.escape, where) if kw == "LABEL" else [("maintainer", ins.args)]
            labels = dict(state.config.get("Labels") or {})
            labels.update(pairs)
            state.config["Labels"] = labels
            self._meta(state, ins, ins.text)
        elif kw in ("CMD", "ENTRYPOINT"):
            argv = self._argv(ins, state)
            state.config["Cmd" if kw == "CMD" else "Entrypoint"] = argv
            if kw == "CMD":
                state.cmd_set = True
            elif not state.cmd_set:
                state.config.pop("Cmd", None)  # Docker: ENTRYPOINT drops an inherited CMD
            self._meta(state, ins, ins.text)
        elif kw == "USER":
            state.config["User"] = self._single(ins, env, where)
            self._meta(state, ins, f"USER {state.config['User']}")
        elif kw == "EXPOSE":
            ports = dict(state.config.get("ExposedPorts") or {})
            for word in words(ins.args, env, self.df.escape, where):
                ports.update({port: {} for port in _ports(word, where)})
            state.config["ExposedPorts"] = ports
            self._meta(state, ins, ins.text)
        elif kw == "VOLUME":
            paths = list(ins.exec_form) if ins.exec_form is not None else words(ins.args, env, self.df.escape, where)
            volumes = dict(state.config.get("Volumes") or {})
            volumes.update({path: {} for path in paths})
            state.config["Volumes"] = volumes
            self._meta(state, ins, ins.text)
        elif kw == "STOPSIGNAL":
            state.config["StopSignal"] = self._single(ins, env, where)
            self._meta(state, ins, ins.text)
        elif kw == "SHELL":
            state.config["Shell"] = list(ins.exec_form or ())
            self._meta(state, ins, ins.text)
        elif kw == "HEALTHCHECK":
            state.config["Healthcheck"] = _healthcheck(ins, state, where)
            self._meta(state, ins, ins.text)
        elif kw == "ONBUILD":
            state.config["OnBuild"] = [*(state.config.get("OnBuild") or []), ins.args]
            self._meta(state, ins, ins.text)
        elif kw == "WORKDIR":
            path = self._single(ins, env, where)
            path = posixpath.normpath(posixpath.join(state.config.get("WorkingDir") or "/", path))
            state.config["WorkingDir"] = path
            self._layer_step(state, ins, f"WORKDIR {path}", "", lambda changes_dir: self._workdir(state, path,
                                                                                                  changes_dir))
        elif kw == "RUN":
            self._run(ins, state, env)
        elif kw in ("COPY", "ADD"):
            self._copy(ins, state, env)
        else:
            raise self.df.error(ins.line, f"{kw} cannot be built here")

    # -- metadata steps ------------------------------------------------------------------
    def _meta(self, state: State, ins: Instruction, text: str, record: bool = True) -> None:
        state.key = C.chain(state.key, text)
        if record:
            state.history.append({"created": state.created, "created_by": text, "empty_layer": True})

    def _single(self, ins: Instruction, env: dict[str, str], where: str) -> str:
        found = words(ins.args, env, self.df.escape, where)
        if len(found) != 1:
            raise self.df.error(ins.line, f"{ins.keyword} takes one value")
        return found[0]

    def _argv(self, ins: Instruction, state: State) -> list[str]:
        if ins.exec_form is not None:
            return list(ins.exec_form)
        if not ins.args:
            return []
        return [*(state.config.get("Shell") or DEFAULT_SHELL), ins.args]

    # -- layer steps ---------------------------------------------------------------------
    def _layer_step(self, state: State, ins: Instruction, text: str, inputs: str,
                    make: Callable[[str], str | None]) -> None:
        """Look the step up in the cache; run ``make(changes_dir)`` on a miss (it fills the
        changeset, or returns the directory that holds it)."""
        key = C.chain(state.key, text, inputs)
        entry = None if self.options.no_cache else self.cache.get(key)
        if entry is not None:
            sys.stderr.write("--> CACHED\n")
            if state.rootfs is not None and entry.get("layer"):
                self._apply_cached(state, entry["layer"])
        else:
            self._materialize(state)
            changes_dir = tempfile.mkdtemp(prefix="changes-", dir=self.work)
            made = make(changes_dir) or changes_dir
            entry = self._commit_changes(made, text, state.rootfs)
            self.cache.put(key, entry)
        state.key = key
        if entry.get("layer"):
            state.layers.append(entry["layer"])
            state.diff_ids.append(entry["diff_id"])
        state.created = entry["created"] if not self.epoch else self._time(self.epoch)
        history = {"created": state.created, "created_by": text}
        if not entry.get("layer"):
            history["empty_layer"] = True
        state.history.append(history)

    def _commit_changes(self, changes_dir: str, text: str, rootfs: str | None) -> dict[str, Any]:
        """The changeset as a stored layer, applied to the rootfs; the cache entry."""
        created = self._time(self.epoch or time.time())
        if changes.is_empty(changes_dir):
            return {"layer": None, "created": created, "created_by": text}
        fd, out = tempfile.mkstemp(prefix="layer-", suffix=".tar.gz", dir=self.store.root / "tmp")
        os.close(fd)
        try:
            info = userns.call(self.maps, _write_and_apply, changes_dir, out, self.epoch, rootfs)
            from mesobox.image.build.commit import OCI_LAYER_GZIP, put_layer_file

            put_layer_file(self.store, out, info["digest"], info["size"])
        finally:
            if os.path.exists(out):
                os.unlink(out)
        layer = {"digest": info["digest"], "size": info["size"], "media_type": OCI_LAYER_GZIP}
        return {"layer": layer, "diff_id": info["diff_id"], "created": created, "created_by": text}

    def _materialize(self, state: State) -> None:
        if state.rootfs is not None:
            return
        rootfs = tempfile.mkdtemp(prefix="rootfs-", dir=self.work)
        blobs = [self._blob(layer) for layer in state.layers]
        userns.call(self.maps, _extract, rootfs, blobs, self.config.max_image_bytes)
        state.rootfs = rootfs

    def _apply_cached(self, state: State, layer: dict[str, Any]) -> None:
        assert state.rootfs is not None
        userns.call(self.maps, _extract, state.rootfs, [self._blob(layer)], self.config.max_image_bytes)

    def _blob(self, layer: dict[str, Any]) -> str:
        path = self.store.intact_blob(str(layer["digest"]), layer.get("size"))
        if path is None:
            raise BuildError(f"layer {layer['digest']} is missing or damaged in the store",
                             hint="build again with --no-cache, or pull the base image again")
        return str(path)

    # -- RUN -----------------------------------------------------------------------------
    def _run(self, ins: Instruction, state: State, env: dict[str, str]) -> None:
        argv = self._argv(ins, state)
        run_env = self._run_env(state)
        inputs = "\0".join(run_env)

        def make(changes_dir: str) -> str:
            from mesobox.image.build.runstep import prepare_rootfs, run_command

            assert state.rootfs is not None
            userns.call(self.maps, prepare_rootfs, state.rootfs, str(state.config.get("WorkingDir") or "/"))
            os.rmdir(changes_dir)
            overlay = changes_dir
            os.mkdir(overlay, 0o700)
            status = run_command(self.config, state.rootfs, overlay, argv, run_env,
                                 str(state.config.get("User") or ""), str(state.config.get("WorkingDir") or "/"))
            if status != 0:
                raise BuildError(f"{self.df.path}:{ins.line}: RUN failed with exit status {status}: "
                                 f"{_short(ins.text)}")
            upper = os.path.join(overlay, "upper")
            if not os.path.isdir(upper):
                os.mkdir(upper)
            return upper

        self._layer_step(state, ins, ins.text, inputs, make)

    def _run_env(self, state: State) -> list[str]:
        """The RUN environment: the image's Env (PATH by default), then ARG values it lacks."""
        env = list(state.config.get("Env") or [])
        names = {e.partition("=")[0] for e in env}
        if "PATH" not in names:
            env.insert(0, DEFAULT_PATH)
        if "HOME" not in names:
            env.append("HOME=/root" if str(state.config.get("User") or "root") in ("", "root", "0") else "HOME=/")
        env += [f"{k}={v}" for k, v in state.args.items() if k not in names]
        return env

    # -- COPY / ADD ----------------------------------------------------------------------
    def _copy(self, ins: Instruction, state: State, env: dict[str, str]) -> None:
        where = self._where(ins)
        items = list(ins.exec_form) if ins.exec_form is not None else words(ins.args, env, self.df.escape, where)
        if ins.exec_form is not None:
            items = [self._expand(item, env) for item in items]
        if len(items) < 2:
            raise self.df.error(ins.line, f"{ins.keyword} needs a source and a destination",
                                hint=f"{ins.keyword} SRC... DEST")
        *sources, dest = items
        if ins.keyword == "ADD" and any("://" in s for s in sources):
            raise self.df.error(ins.line, "ADD of a URL is not supported", hint="RUN curl/wget it instead")
        dest_is_dir = dest.endswith("/") or dest in (".", "./")
        dest = posixpath.normpath(posixpath.join(state.config.get("WorkingDir") or "/", dest))
        chown = ins.flag("chown")
        chown = self._expand(chown, env) if chown else None
        chmod = _chmod(ins.flag("chmod"), where)
        source_stage = ins.flag("from")
        if source_stage is not None:
            found = self._stage_named(source_stage, len(self.df.stages))
            assert found is not None  # checked by _needed
            source = self.states[found.index]
            rels = list(sources)
            inputs = f"stage {source.key} " + "\0".join(rels)
        else:
            rels = [rel for text in sources for rel in self.context.sources(text)]
            inputs = self.context.digest(rels)
        text = f"{ins.keyword} " + "".join(f"--{k}={v} " for k, v in ins.flags) + " ".join([*sources, dest]) + \
            ("/" if dest_is_dir and dest != "/" else "")

        def make(changes_dir: str) -> None:
            from mesobox.image.build.copying import CopyJob, run_copy

            assert state.rootfs is not None
            if source_stage is not None:
                self._materialize(source)
                assert source.rootfs is not None
                root = source.rootfs
                resolved = userns.call(self.maps, _stage_sources, root, rels)
            else:
                root, resolved = self.context.root, rels
            job = CopyJob(changes=changes_dir, rootfs=state.rootfs, source_root=root, sources=resolved, dest=dest,
                          dest_is_dir=dest_is_dir, chown=chown, chmod=chmod, keep_owner=source_stage is not None,
                          extract=ins.keyword == "ADD", ignore=None if source_stage else self.context.ignore)
            userns.call(self.maps, run_copy, job)

        self._layer_step(state, ins, text, inputs, make)

    def _workdir(self, state: State, path: str, changes_dir: str) -> None:
        from mesobox.image.build.copying import make_dirs

        assert state.rootfs is not None
        userns.call(self.maps, make_dirs, changes_dir, state.rootfs, path)

    # -- helpers -------------------------------------------------------------------------
    def _env(self, state: State) -> dict[str, str]:
        """What ``$VAR`` means in this stage: its ARG values, then its Env."""
        env = dict(state.args)
        for item in state.config.get("Env") or []:
            name, _, value = str(item).partition("=")
            env[name] = value
        return env

    def _expand(self, text: str, env: dict[str, str]) -> str:
        from mesobox.image.build.dockerfile import substitute

        return substitute(text, env, self.df.escape)

    def _where(self, ins: Instruction) -> str:
        return f"{self.df.path}:{ins.line}: "

    def _say(self, text: str) -> None:
        self.step += 1
        sys.stderr.write(f"STEP {self.step}/{self.total}: {_short(text, 200)}\n")
        sys.stderr.flush()

    @staticmethod
    def _time(seconds: float) -> str:
        from mesobox.image.build.commit import iso_time

        return iso_time(seconds)

    def _image_config(self, state: State) -> dict[str, Any]:
        config = dict(state.config)
        if not any(str(e).startswith("PATH=") for e in config.get("Env") or []) and state.layers:
            config["Env"] = [DEFAULT_PATH, *(config.get("Env") or [])]
        history = state.history
        if self.epoch:
            history = [{**h, "created": self._time(self.epoch)} for h in history]
        return {"created": self._time(self.epoch) if self.epoch else state.created,
                "architecture": state.platform[1], "os": state.platform[0], "config": config,
                "rootfs": {"type": "layers", "diff_ids": state.diff_ids}, "history": history}


# --- run in the build's user namespace ------------------------------------------------------


def _write_and_apply(changes_dir: str, out: str, epoch: int, rootfs: str) -> dict[str, Any]:
    info = changes.write_layer(changes_dir, out, epoch)
    changes.apply(changes_dir, rootfs)
    return info


def _extract(rootfs: str, blobs: list[str], max_bytes: int) -> None:
    from pathlib import Path

    from mesobox.image.layers import LayerPolicy, apply_layers

    apply_layers(Path(rootfs), [Path(b) for b in blobs],
                 LayerPolicy(unprivileged=False, keep_setuid=True, max_bytes=max_bytes))


def _stage_sources(root: str, sources: list[str]) -> list[str]:
    """COPY --from sources in a stage's rootfs: resolved there, patterns matched."""
    import fnmatch

    from mesobox.errors import UsageError
    from mesobox.image.build.context import GLOB_CHARS, resolve

    out: list[str] = []
    for text in sources:
        if any(c in text for c in GLOB_CHARS):
            parent = resolve(root, posixpath.dirname(text.lstrip("/")))
            pattern = posixpath.basename(text)
            try:
                names = sorted(os.listdir(os.path.join(root, parent)))
            except OSError:
                names = []
            matched = [f"{parent}/{n}".lstrip("/") for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                raise UsageError(f"COPY --from: nothing matches {text!r}")
            out += matched
            continue
        rel = resolve(root, text.lstrip("/"))
        if not os.path.lexists(os.path.join(root, rel)):
            raise UsageError(f"COPY --from: {text!r} does not exist in that stage")
        out.append(rel)
    return out


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _ports(word: str, where: str) -> list[str]:
    from mesobox.errors import UsageError

    port, _, proto = word.partition("/")
    proto = (proto or "tcp").lower()
    low, _, high = port.partition("-")
    if not low.isdigit() or (high and not high.isdigit()) or proto not in ("tcp", "udp", "sctp"):
        raise UsageError(f"{where}EXPOSE: bad port {word[:40]!r}", hint="PORT[/tcp|udp] or FROM-TO[/PROTO]")
    first, last = int(low), int(high or low)
    if not 0 < first <= last <= 65535:
        raise UsageError(f"{where}EXPOSE: port out of range in {word[:40]!r}")
    return [f"{n}/{proto}" for n in range(first, last + 1)]


def _chmod(text: str | None, where: str) -> int | None:
    if text is None:
        return None
    if not text or any(c not in "01234567" for c in text) or len(text) > 4:
        from mesobox.errors import UsageError

        raise UsageError(f"{where}--chmod={text[:20]}: only octal modes are supported", hint="--chmod=0755")
    return int(text, 8)


_UNITS = {"ns": 1, "us": 1000, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def _duration(text: str, where: str) -> int:
    """Go's time.ParseDuration subset Docker takes: 30s, 1m30s, 500ms → nanoseconds."""
    import re

    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        from mesobox.errors import UsageError

        raise UsageError(f"{where}HEALTHCHECK: bad duration {text[:20]!r}", hint="for example 30s or 1m30s")
    return int(sum(float(n) * _UNITS[u] for n, u in parts))


def _healthcheck(ins: Instruction, state: State, where: str) -> dict[str, Any]:
    from mesobox.errors import UsageError

    head, _, rest = ins.args.partition(" ")
    if head.upper() == "NONE":
        return {"Test": ["NONE"]}
    if head.upper() != "CMD" or not rest.strip():
        raise UsageError(f"{where}HEALTHCHECK takes NONE or [OPTIONS] CMD COMMAND")
    rest = rest.strip()
    test: list[str]
    if rest.startswith("["):
        import json

        try:
            test = ["CMD", *json.loads(rest)]
        except ValueError:
            test = ["CMD-SHELL", rest]
    else:
        test = ["CMD-SHELL", rest]
    check: dict[str, Any] = {"Test": test}
    for name, key in (("interval", "Interval"), ("timeout", "Timeout"), ("start-period", "StartPeriod"),
                      ("start-interval", "StartInterval")):
        value = ins.flag(name)
        if value is not None:
            check[key] = _duration(value, where)
    retries = ins.flag("retries")
    if retries is not None:
        if not retries.isdigit():
            raise UsageError(f"{where}HEALTHCHECK --retries must be a number")
        check["Retries"] = int(retries)
    return check
