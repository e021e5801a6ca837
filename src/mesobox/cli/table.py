"""The option table: every verb of ``mesobox``, its options and their help, in one place.

Everything the command line knows is read from here: the one parser every verb uses
(``parse`` below, lean enough for ``mesobox run``), each verb's ``--help`` and the man
pages (cli/usage.py), bash and zsh completion (cli/completion.py), and which words of
an srun command line are mesobox's (cli/slurm.py).  Which module runs a verb is the
dispatcher's business (cli/__init__.py); its tests check that both name the same verbs.

Read on the ``mesobox run`` path, so it imports nothing (errors.py only to raise):
plain data and one small parser.  Only run/exec/shell are built at import; the other
verbs when first asked for (``verbs()``, ``find()``).

Grammar, getopt_long's without abbreviations: ``-Bvalue`` and ``-B value``,
``--bind=value`` and ``--bind value``; bundled flags ``-it``; an optional value only as
``--opt=value``;
``--`` ends the options; ``-h``/``--help`` among them asks for help.  A verb either
stops taking options at its first argument (``run``: the rest is the command) or takes
them between its arguments (``pull REF --quiet``), where ``-9`` is an argument.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from mesobox.errors import UsageError

# What an option takes.
FLAG = "flag"  # --pid
VALUE = "value"  # --net host, --net=host, -wDIR; the last one given counts
OPTIONAL = "optional"  # --writable-tmpfs, --writable-tmpfs=SIZE (never the next word)
LIST = "list"  # like VALUE, repeatable: every value, in order

# parse(): where an inherited option lands (``instance start`` hands run options on as typed).
INHERITED = "inherited"
HELP_NAMES = ("-h", "--help")


class Option:
    """One option: its names, what it takes, and what it is for."""

    __slots__ = ("choices", "field", "help", "kind", "metavar", "names", "required", "words")

    def __init__(self, names: str, kind: str, help: str, metavar: str = "", *, field: str = "",
                 choices: tuple[str, ...] = (), words: tuple[str, ...] = (), required: bool = False) -> None:
        self.names = tuple(names.split())
        self.kind = kind
        self.help = help
        self.metavar = metavar
        # Where parse() puts the value: for run/exec/shell a RunOptions field (launch/specbuild.py),
        # else the first long name's.
        self.field = field or next(n for n in self.names if n.startswith("--"))[2:].replace("-", "_")
        self.choices = choices  # when set, the only values accepted
        self.words = words or choices  # what completion offers for the value
        self.required = required

    @property
    def takes_value(self) -> bool:
        """Does it take the next word, when no value is attached?"""
        return self.kind in (VALUE, LIST)


class Verb:
    """A verb (or a verb's verb, as ``instance start``): what it is for, its arguments
    (``args``, a synopsis: ``[X]`` optional, ``X...`` repeatable) and its options.
    ``inherit``: a verb whose options it accepts too and hands on as typed;
    ``passes_on``: the program that gets every option not in the table (srun, sbatch),
    where only the inherited options' long names are mesobox's."""

    __slots__ = (
        "_index",
        "about",
        "aliases",
        "args",
        "inherit",
        "name",
        "options",
        "passes_on",
        "path",
        "stop_at_args",
        "subverbs",
        "summary",
    )

    def __init__(self, name: str, summary: str, args: str = "", options: tuple[Option, ...] = (), *,
                 subverbs: tuple[Verb, ...] = (), inherit: Verb | None = None, stop_at_args: bool = False,
                 about: str = "", aliases: tuple[str, ...] = (), passes_on: str = "") -> None:
        self.name = name
        self.summary = summary
        self.args = args
        self.options = options
        self.subverbs = subverbs
        self.inherit = inherit
        self.stop_at_args = stop_at_args
        self.about = about
        self.aliases = aliases
        self.passes_on = passes_on
        self.path = name  # "instance start" for a subverb: set by its parent
        self._index: dict[str, tuple[Option, bool]] | None = None
        for sub in subverbs:
            sub.path = f"{name} {sub.name}"

    def index(self) -> dict[str, tuple[Option, bool]]:
        """Option name → (option, own?); not own: inherited, handed on as typed."""
        if self._index is None:
            index: dict[str, tuple[Option, bool]] = {}
            for opt in self.inherit.options if self.inherit is not None else ():
                for name in opt.names:
                    index[name] = (opt, False)
            for opt in self.options:
                for name in opt.names:
                    index[name] = (opt, True)
            self._index = index
        return self._index

    def subverb(self, name: str) -> Verb | None:
        for sub in self.subverbs:
            if name == sub.name or name in sub.aliases:
                return sub
        return None


# --- the verbs -----------------------------------------------------------------------------

IMAGE_ABOUT = "IMAGE: a directory rootfs, a squashfs file, a stored reference, or docker://REF (pulled if missing)."
SECONDS = "a number with an optional unit: 30s, 10m, 2h, 1d"

# run/exec/shell; field: the RunOptions field, except mpi and debug (taken out before).
RUN_OPTIONS = (
    Option("-B --bind", LIST, "bind a host path (repeatable, comma lists ok; always nosuid,nodev)",
           "SRC[:DST[:ro|rw]]", field="binds"),
    Option("--device", LIST, "bind a host character or block device (repeatable; nosuid, not nodev; PERMS: rw or "
           "rwm, m ignored); or a CDI device VENDOR/CLASS=NAME (or =all) from the site's CDI specs",
           "HOST[:CTR][:PERMS]|VENDOR/CLASS=NAME", field="devices"),
    Option("--nv", FLAG, "NVIDIA GPUs: the job's device nodes, driver libraries and tools from the host",
           field="nv"),
    Option("--rocm", FLAG, "AMD GPUs: /dev/kfd, /dev/dri nodes, ROCm libraries and tools from the host",
           field="rocm"),
    Option("--rdma", FLAG, "InfiniBand/RDMA: /dev/infiniband nodes, the host's verbs libraries and providers",
           field="rdma"),
    Option("-c --contain", FLAG, "no default binds ($HOME, working directory, /tmp, site binds)", field="contain"),
    Option("-e --env", LIST, "set a variable (K alone copies the host's); repeatable", "K=V|K", field="env"),
    Option("--env-file", LIST, "KEY=VALUE lines; repeatable", "FILE", field="env_files"),
    Option("--cleanenv", FLAG, "do not pass the host environment through", field="cleanenv"),
    Option("-w --workdir --pwd", VALUE, "working directory inside", "DIR", field="workdir"),
    Option("--entrypoint", VALUE, 'replace the image Entrypoint (run only; "" clears it)', "CMD",
           field="entrypoint"),
    Option("--fakeroot", FLAG, "be uid 0 inside (files you write stay yours on the host)", field="fakeroot"),
    Option("--host-root", FLAG, "(real root only) container root is host root; default: a sub-id range",
           field="host_root"),
    Option("--writable-tmpfs", OPTIONAL, "writable root: changes in a tmpfs capped at SIZE, then discarded",
           "SIZE", field="writable_tmpfs"),
    Option("--overlay", VALUE, "writable root: changes kept in DIR, or in an ext4 image FILE with a size quota "
           "(`mesobox overlay create FILE SIZE`; root loop-mounts it, fuse2fs serves a user's own)", "DIR|FILE",
           field="overlay"),
    Option("--pid", FLAG, "new pid namespace", field="pid"),
    Option("--ipc", FLAG, "new IPC namespace", field="ipc"),
    Option("--uts", FLAG, "new UTS namespace", field="uts"),
    Option("--userns", VALUE, "shared: one user namespace with your other containers of this Slurm job and node, "
           "so MPI ranks copy with CMA (default when /dev/shm is the host's and no --pid); private: its own",
           "shared|private", field="userns", choices=("shared", "private")),
    Option("--hostname", VALUE, "hostname inside (implies --uts)", "NAME", field="hostname"),
    Option("--net --network", VALUE, "network (default host)", "host|none|slirp", field="net",
           words=("host", "none", "slirp")),
    Option("-p --publish", LIST, "with --net slirp: forward a host port (repeatable)", "HOST:CTR", field="publish"),
    Option("-m --memory", VALUE, "cgroup limit: memory", "SIZE", field="memory"),
    Option("--cpus", VALUE, "cgroup limit: CPUs (fractions allowed)", "N", field="cpus"),
    Option("--pids-limit", VALUE, "cgroup limit: processes", "N", field="pids_limit"),
    Option("--cpuset-cpus", VALUE, "CPUs the workload may use (e.g. 0-1)", "LIST", field="cpuset_cpus"),
    Option("--io-read-bps", LIST, "block I/O read rate limit (repeatable)", "DEV:RATE", field="io_read_bps"),
    Option("--io-write-bps", LIST, "block I/O write rate limit (repeatable)", "DEV:RATE", field="io_write_bps"),
    Option("--io-read-iops", LIST, "block I/O read operations limit (repeatable)", "DEV:RATE",
           field="io_read_iops"),
    Option("--io-write-iops", LIST, "block I/O write operations limit (repeatable)", "DEV:RATE",
           field="io_write_iops"),
    Option("--security-opt", LIST, "system-call filter: seccomp=default|unconfined|FILE", "OPT",
           field="security_opts", words=("seccomp=default", "seccomp=unconfined")),
    Option("--cap-add", LIST, "add to Docker's default capability set (uid 0 inside); ALL allowed", "CAP",
           field="cap_add"),
    Option("--cap-drop", LIST, "drop from Docker's default capability set; ALL allowed", "CAP", field="cap_drop"),
    Option("--mpi", VALUE, "bind the host's MPI (libmpi and its libraries) into the container", "host",
           field="mpi", words=("host",)),
    Option("--debug", FLAG, "print the spec and each mount step (also: mesobox --debug VERB ...)", field="debug"),
    # The flags people type from Docker/Podman and Apptainer (docs/running.md has the table).
    Option("-v --volume", LIST, "Docker's bind: as -B, but DST is required (repeatable; no comma lists)",
           "SRC:DST[:ro|rw]", field="volumes"),
    Option("--mount", LIST, "Docker's mount: type=bind,source=SRC,target=DST[,readonly] or "
           "type=tmpfs,target=DST[,tmpfs-size=SIZE][,tmpfs-mode=MODE] (repeatable)", "SPEC", field="mounts"),
    Option("--tmpfs", LIST, "a private tmpfs at DST (nosuid,nodev; repeatable)", "DST[:size=SIZE,mode=MODE]",
           field="tmpfs"),
    Option("--read-only", FLAG, "read-only root (the default: for Docker habits; refused with --writable-tmpfs "
           "or --overlay)", field="read_only"),
    Option("-u --user", VALUE, "run as UID[:GID] or NAME[:GROUP] of the image; other ids than yours need "
           "--fakeroot with a sub-id range (or real root)", "UID[:GID]", field="user"),
    Option("--shm-size", VALUE, "a private /dev/shm tmpfs of SIZE instead of the host's", "SIZE",
           field="shm_size"),
    Option("--ulimit", LIST, "a resource limit, set before the command starts (repeatable; -1 or unlimited: no "
           "limit; raising a hard limit needs privilege)", "NAME=SOFT[:HARD]", field="ulimits"),
    Option("--init", FLAG, "mesobox's minimal init as pid 1: forwards signals, reaps orphans (implies --pid)",
           field="init"),
    Option("--platform", VALUE, "only this host's platform runs: accepted when it names it", "OS/ARCH[/VARIANT]",
           field="platform"),
    Option("-i --interactive", FLAG, "accepted: stdin is always passed through", field="interactive"),
    Option("-t --tty", FLAG, "accepted: the terminal is always passed through", field="tty"),
    Option("-d --detach", FLAG, "refused: a detached container is an instance (`mesobox instance start`)",
           field="detach"),
    Option("--rm", FLAG, "accepted: a container leaves nothing behind anyway", field="rm"),
    Option("--containall", FLAG, "--contain, --pid, --ipc and --cleanenv together (Apptainer's)",
           field="containall"),
    Option("--no-home", FLAG, "do not bind $HOME", field="no_home"),
    Option("--no-mount", LIST, "leave out default binds: home, tmp, cwd, bind-paths (the site's), hostfs (never "
           "made), or a site bind's destination (repeatable, comma lists ok)", "LIST", field="no_mount",
           words=("home", "tmp", "cwd", "bind-paths", "hostfs")),
    Option("--dns", LIST, "a generated /etc/resolv.conf naming these servers (repeatable, comma lists ok)",
           "IP[,IP...]", field="dns"),
    Option("--home", VALUE, "bind SRC as the home directory DST (default: SRC) and set HOME", "SRC[:DST]",
           field="home"),
)

RUN = Verb("run", "run an image's default command (Docker semantics)", "IMAGE [ARGS...]", RUN_OPTIONS,
           stop_at_args=True, about=IMAGE_ABOUT)
EXEC = Verb("exec", "run a command in an image", "IMAGE CMD [ARGS...]", RUN_OPTIONS, stop_at_args=True,
            about=IMAGE_ABOUT)
SHELL = Verb("shell", "start an interactive shell in an image", "IMAGE [ARGS...]", RUN_OPTIONS,
             stop_at_args=True, about=IMAGE_ABOUT)

LAUNCH = {"run": RUN, "exec": EXEC, "shell": SHELL}

# The other verbs are built when first asked for: a launch needs only run's (above).
_table: tuple[tuple[Verb, ...], Verb] | None = None


def verbs() -> tuple[Verb, ...]:
    """Every verb, in the order ``mesobox --help`` lists them."""
    return _build()[0]


def toplevel() -> Verb:
    """mesobox itself: the options before the verb (``mesobox --debug run ...``)."""
    return _build()[1]


def _build() -> tuple[tuple[Verb, ...], Verb]:
    global _table
    if _table is None:
        _table = _verbs()
    return _table


def _verbs() -> tuple[tuple[Verb, ...], Verb]:
    json_flag = Option("--json", FLAG, "print JSON")

    image_verbs = (
        Verb("build", "build an image from a Dockerfile, as an ordinary user", "CONTEXT", (
            Option("-t --tag", VALUE, "the name of the image in the store", "REFERENCE", required=True),
            Option("-f --file", VALUE, "the Dockerfile; default: CONTEXT/Dockerfile, else CONTEXT/Containerfile",
                   "FILE"),
            Option("--build-arg", LIST, "a value for an ARG (NAME alone: the value of $NAME here)", "NAME[=VALUE]",
                   field="build_args"),
            Option("--target", VALUE, "build this stage (FROM ... AS STAGE) and the stages it needs", "STAGE"),
            Option("--no-cache", FLAG, "run every step again (the results still fill the cache)"),
            Option("--format", VALUE, "how to keep the flattened image; default: the configured default_format",
                   "squashfs|dir", choices=("squashfs", "dir")),
        ), about="Build an image from a Dockerfile and store it as a pull would (run, push, export it).  RUN steps "
                 "run as root in a user namespace that maps your sub-ids (/etc/subuid, as --fakeroot), so package "
                 "managers work; each RUN, COPY and ADD makes one layer, and an unchanged step is taken from the "
                 "cache (CACHED).  Prints the image digest.  See docs/build.md."),
        Verb("pull", "fetch an image into the store", "REFERENCE", (
            Option("--platform", VALUE, "OS/ARCH[/VARIANT]; default: this host's", "PLATFORM"),
            Option("--format", VALUE, "how to keep the flattened image; default: the configured default_format",
                   "squashfs|dir", choices=("squashfs", "dir")),
            Option("--insecure", FLAG, "allow plain HTTP to this registry"),
            Option("-q --quiet", FLAG, "no progress display"),
            Option("--json", FLAG, "print one JSON object (reference, digest, format, path, size, seconds...) "
                   "instead of the digest"),
        ), about="Fetch an image into the store and flatten it; prints the manifest digest.  On a terminal, a "
                 "progress line shows the bytes, the transfer rate and the time left.  REFERENCE: "
                 "docker://REF, REF, oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE."),
        Verb("images", "list stored images", "", (json_flag,), about="List stored images (site caches included)."),
        Verb("inspect", "show an image's configuration, or an instance's state, as JSON", "REFERENCE|NAME", (
            Option("--type", VALUE, "what NAME is; default: an image if one has that name, else an instance",
                   "image|instance", choices=("image", "instance")),
        ), about="Show a stored image's configuration and digests (its squashfs file's too), or an instance's "
                 "state with the image digest its current run started from."),
        Verb("rm", "remove an image from the store", "REFERENCE...",
             about="Remove images from the store; their blobs stay until `mesobox prune`."),
        Verb("prune", "delete blobs and caches no image uses",
             about="Delete blobs, flattened images and leftovers that no stored image uses."),
        Verb("export", "write an image as dir, squashfs or OCI layout", "REFERENCE", (
            Option("--format", VALUE, "what to write", "dir|squashfs|oci", choices=("dir", "squashfs", "oci"),
                   required=True),
            Option("-o --output", VALUE, "the new file or directory (an empty directory is fine)", "PATH",
                   required=True),
        ), about="Write a stored image as a directory, a squashfs file or an OCI image layout.  Every blob is "
                 "hashed again as it is written; when export fails, nothing it wrote is left behind.  A squashfs "
                 "file carries the image config after the filesystem: running it behaves like running the stored "
                 "image, and `mesobox inspect FILE` shows it."),
        Verb("push", "copy a stored image to a registry, an OCI layout or an OCI archive", "SOURCE DESTINATION", (
            Option("--chunk-size", VALUE, "blobs larger than SIZE go up in chunks of SIZE (PATCH); default: 32m",
                   "SIZE"),
            Option("--insecure", FLAG, "allow plain HTTP to this registry"),
            Option("-q --quiet", FLAG, "no line per blob on stderr"),
            Option("--json", FLAG, "print one JSON object (destination, digest, each blob and what was done) "
                   "instead of the digest"),
        ), about="SOURCE: a stored reference, or its manifest digest (sha256:HEX, or 12 or more of its first hex "
                 "digits).  DESTINATION: docker://HOST/REPO[:TAG], oci:DIR[:TAG] (a new, empty or existing OCI "
                 "layout; TAG defaults to the source's) or oci-archive:FILE[:TAG].  The stored manifest and blobs "
                 "are sent as they are, so the digest printed is the stored one.  A registry is asked for each blob "
                 "first (HEAD) and only missing ones go up, mounted from the repository the image came from when "
                 "that is on the same registry.  Credentials as for pull (`mesobox login`).  See docs/build.md."),
        Verb("tag", "add a name to a stored image", "SOURCE NEWREF",
             about="SOURCE: a stored reference or manifest digest.  NEWREF: [HOST/]REPO[:TAG] (latest when no tag); "
                   "a name that named another image moves to this one.  No data is copied, and `mesobox rm` of "
                   "one name keeps the image for the other."),
        Verb("login", "check and store credentials for a registry", "REGISTRY", (
            Option("-u --username", VALUE, "the user name; default: asked for", "USER"),
            Option("--password-stdin", FLAG, "read the password (or token) from stdin"),
            Option("-p --password", VALUE, "refused: every user of the node sees a command line in ps; use the "
                   "prompt or --password-stdin", "PASSWORD"),
            Option("--authfile", VALUE, "the auth file to write; default: $REGISTRY_AUTH_FILE, else "
                   "$XDG_RUNTIME_DIR/containers/auth.json (podman's)", "FILE"),
            Option("--insecure", FLAG, "allow plain HTTP to this registry"),
        ), about="REGISTRY: HOST[:PORT][/NAMESPACE] (docker.io for Docker Hub).  The credentials are checked "
                 "against the registry (its token service, or Basic auth) before they are stored, mode 0600, in "
                 "the auth file podman and `mesobox pull` read.  See docs/images.md."),
        Verb("logout", "remove a registry's stored credentials", "[REGISTRY]", (
            Option("-a --all", FLAG, "every registry's credentials in the auth file"),
            Option("--authfile", VALUE, "the auth file; default: where `mesobox login` writes", "FILE"),
        ), about="Remove what `mesobox login` stored; credentials in ~/.docker/config.json are docker's."),
    )

    instance = Verb("instance", "manage long-lived containers (cloud mode)", subverbs=(
        Verb("start", "start an instance: `mesobox run` under a detached supervisor", "IMAGE NAME [ARGS...]", (
            Option("--restart", VALUE, "restart policy; default: no", "no|on-failure[:N]|always",
                   words=("no", "on-failure", "always")),
            Option("--time", VALUE, f"stop it after DURATION ({SECONDS})", "DURATION", field="time_limit"),
            Option("-t --grace", VALUE, "seconds between SIGTERM and SIGKILL when it is stopped; default: 10",
                   "SECONDS"),
            Option("--checkpoint-dir", VALUE, "preemption-aware: a stop sends --checkpoint-signal, the workload may "
                   "save its state in DIR (bound, $MESOBOX_CHECKPOINT_DIR), its writable layer is kept in DIR/layer, "
                   "and a later start with the same DIR resumes from both", "DIR"),
            Option("--checkpoint-signal", VALUE, "the signal a stop sends instead of SIGTERM (default USR1)", "SIG"),
        ), inherit=RUN, stop_at_args=True),
        Verb("list", "list instances", "", (
            Option("-a --all", FLAG, "exited and failed ones too"),
            json_flag,
        ), aliases=("ls",)),
        Verb("stop", "stop instances and remove them", "NAME...", (
            Option("-t --time --grace", VALUE, "seconds between SIGTERM and SIGKILL; default: the instance's --grace",
                   "SECONDS", field="grace"),
        )),
        Verb("logs", "print an instance's output", "NAME", (
            Option("-f --follow", FLAG, "keep printing while it runs"),
        )),
        Verb("exec", "run a command in an instance's namespaces", "NAME CMD [ARGS...]", stop_at_args=True),
        Verb("pause", "freeze an instance (cgroup freezer, or SIGSTOP without one)", "NAME"),
        Verb("resume", "thaw a paused instance", "NAME"),
        Verb("snapshot", "copy an instance's overlay changes", "NAME DEST",
             about="DEST: a directory, or *.tar / *.tar.gz.  The instance needs --overlay."),
        Verb("stats", "show instances' CPU, memory, I/O and task counts", "[NAME...]", (
            Option("--no-stream", FLAG, "print one sample and exit; default: one every --interval until ^C"),
            Option("--interval", VALUE, "seconds between samples; default: 1", "SECONDS"),
            json_flag,
        ), about="From the instance's cgroup when it has one, else summed over its processes in /proc.  "
                 "Without NAME: every running instance."),
        Verb("top", "show an instance's processes", "NAME", (
            json_flag,
        ), about="PID, USER, %CPU (over each process's lifetime, as ps shows it), RSS, COMMAND."),
    ), about="See docs/instances.md.")

    checkpoint = Verb("checkpoint", "checkpoint an instance with CRIU", "NAME DIR",
                      about="Write the instance's checkpoint into DIR and stop it.")
    restore = Verb("restore", "restore an instance from a checkpoint", "NAME DIR",
                   about="Restore the checkpoint in DIR; the process is CRIU's then, not supervised.")

    image = Option("--image", VALUE, "the image; default: $MESOBOX_SLURM_IMAGE (set in batch scripts)", "REF")
    slurm_about = ("mesobox's run options by their long names only (several short letters are srun's: -e, -B); "
                   "`--mpi host` binds the host's MPI, any other --mpi value is srun's.  Every other option "
                   "before the command goes to {tool} untouched.")
    srun = Verb("srun", "run containers as the tasks of a Slurm step", "[SRUN-OPTIONS] [--] CMD [ARGS...]", (image,),
                inherit=RUN, stop_at_args=True, passes_on="srun", about=slurm_about.format(tool="srun"))
    sbatch = Verb("sbatch", "submit a batch job whose tasks are containers", "[SBATCH-OPTIONS] SCRIPT [ARGS...]", (
        image,
        Option("--wrap", VALUE, "the job runs this command line instead of a script", "CMD"),
        Option("--checkpoint-dir", VALUE, "preemption-aware job: at the time-limit warning or a preemption the "
               "steps get --checkpoint-signal, may save their state in DIR (bound, $MESOBOX_CHECKPOINT_DIR), "
               "each task's writable layer is kept in DIR/layers, and the job is requeued", "DIR"),
        Option("--checkpoint-signal", VALUE, "the signal the steps get (default USR1)", "SIG"),
        Option("--checkpoint-warning", VALUE, "seconds before the time limit (default 120)", "SECONDS"),
    ), inherit=RUN, stop_at_args=True, passes_on="sbatch", about=slurm_about.format(tool="sbatch"))
    bundle = Verb("bundle", "make an OCI bundle (config.json + rootfs)", "IMAGE DIR", (
        Option("--copy", FLAG, "copy the rootfs instead of linking to it"),
    ), about="IMAGE: an image reference, squashfs file or rootfs directory; DIR: the bundle directory to create.")

    # `mesobox oci` is mesobox-oci (cli/oci.py parses it, runc's way); this is its help.
    bundle_dir = Option("-b --bundle", VALUE, "the bundle directory (default: the current one)", "DIR")
    pid_file = Option("--pid-file", VALUE, "write the container process's pid to FILE", "FILE")
    console = Option("--console-socket", VALUE, "send a terminal's master fd to this socket", "PATH")
    preserve = Option("--preserve-fds", VALUE, "pass N more fds, from 3 on", "N")
    oci_format = Option("-f --format", VALUE, "output format", "table|json", choices=("table", "json"))
    criu_options = (
        Option("--image-path", VALUE, "the checkpoint's directory (default: ./checkpoint)", "DIR"),
        Option("--work-path", VALUE, "CRIU's work and log directory (default: the image path)", "DIR"),
        Option("--manage-cgroups-mode", VALUE, "CRIU's cgroup mode", "MODE",
               choices=("soft", "full", "strict", "ignore")),
        Option("--tcp-established", FLAG, "established TCP connections (CRIU)"),
        Option("--ext-unix-sk", FLAG, "external unix sockets (CRIU)"),
        Option("--shell-job", FLAG, "a job of a shell, with its terminal (CRIU)"),
        Option("--file-locks", FLAG, "file locks (CRIU)"),
    )
    create_options = (bundle_dir, pid_file, console, preserve, Option("--no-pivot", FLAG, "accepted (no effect)"),
                      Option("--no-new-keyring", FLAG, "accepted (no effect)"))
    oci = Verb("oci", "the OCI runtime mesobox-oci (runc's command line)", subverbs=(
        Verb("create", "set a container up; it waits for start", "ID", create_options),
        Verb("start", "start a created container's command (returns at once)", "ID"),
        Verb("run", "create and start a container (in the foreground: wait for it)", "ID",
             (*create_options, Option("-d --detach", FLAG, "return once it is started"))),
        Verb("state", "print a container's state as JSON", "ID"),
        Verb("kill", "send a signal to a container; default: SIGTERM", "ID [SIGNAL]", (
            Option("-a --all", FLAG, "signal every process of the container"),
        )),
        Verb("delete", "delete a stopped container", "ID...", (
            Option("-f --force", FLAG, "kill a running container first"),
        )),
        Verb("exec", "run a process in a container", "ID [COMMAND [ARG...]]", (
            Option("-p --process", VALUE, "the process, as config.json's process object", "FILE"),
            Option("-t --tty", FLAG, "give it a terminal (with --console-socket)"),
            Option("-d --detach", FLAG, "do not wait for it"), pid_file, console,
            Option("-e --env", LIST, "set an environment variable", "K=V"),
            Option("--cwd", VALUE, "its working directory", "DIR"),
            Option("-u --user", VALUE, "its user", "UID[:GID]"),
            Option("-g --additional-gids", LIST, "an additional group", "GID"),
        ), stop_at_args=True),
        Verb("ps", "list a container's processes", "ID [PS-ARGS...]", (oci_format,), stop_at_args=True),
        Verb("list", "list the containers", "", (oci_format, Option("-q --quiet", FLAG, "ids only"))),
        Verb("pause", "suspend every process of a container", "ID"),
        Verb("resume", "resume a paused container", "ID"),
        Verb("features", "print what the runtime supports, as JSON"),
        Verb("spec", "write a default config.json", "", (
            bundle_dir, Option("--rootless", FLAG, "map the caller's ids (a rootless container)"),
        )),
        Verb("checkpoint", "checkpoint a running container with CRIU (real root)", "ID", (
            *criu_options, Option("--leave-running", FLAG, "keep the container running after the dump"),
        )),
        Verb("restore", "restore a container from a checkpoint with CRIU (real root)", "ID", (
            *criu_options, bundle_dir, Option("-d --detach", FLAG, "return once restored"),
            Option("--pid-file", VALUE, "write the restored process's pid to FILE", "FILE"),
        )),
    ), about="`mesobox oci` is `mesobox-oci`: global options --root DIR, --log FILE, --log-format text|json, "
             "--debug, --systemd-cgroup go before the verb.  docs/oci.md tells the lifecycle and what of "
             "config.json is honoured.")

    slurm = Verb("slurm", "Slurm site helpers (oci-conf, prolog, epilog)", subverbs=(
        Verb("oci-conf", "print an /etc/slurm/oci.conf that runs mesobox", "", (
            Option("--runtime", VALUE, "the command that runs mesobox; default: this interpreter", "CMD"),
        )),
        Verb("prolog", "the node's job prolog (see docs/slurm.md)"),
        Verb("epilog", "the node's job epilog (see docs/slurm.md)"),
        Verb("task", "the node side of `mesobox srun`", "[RUN-OPTIONS] -- IMAGE CMD [ARGS...]", inherit=RUN,
             stop_at_args=True),
    ))

    overlay = Verb("overlay", "create a disk-quota overlay image (--overlay FILE)", subverbs=(
        Verb("create", "make an overlay image with a size quota", "FILE SIZE",
             about="Make FILE, a sparse ext4 image of SIZE (e.g. 512m, 2g) for `mesobox run --overlay FILE`: the "
                   "container's changes are kept in it across runs, and writes past SIZE fail with ENOSPC.  "
                   "Root loop-mounts it; an ordinary user's own image is served by fuse2fs under fuse-overlayfs."),
    ))

    password_env = Option("--password-env", VALUE, "the variable holding the private key's password", "VAR")
    insecure = Option("--insecure", FLAG, "allow plain HTTP to this registry")
    trust_verbs = (
        Verb("key", "make a signing key pair (cosign's format)", subverbs=(
            Verb("generate", "write PREFIX.key (PKCS#8, mode 0600) and PREFIX.pub: ECDSA P-256, PEM", "", (
                Option("-o --output", VALUE, "where: PREFIX.key and PREFIX.pub; default: cosign", "PREFIX"),
                password_env,
            )),
        ), about="See docs/trust.md."),
        Verb("sign", "sign an image in its registry (cosign's format)", "IMAGE", (
            Option("--key", VALUE, "the private key (PEM: PKCS#8 or SEC1)", "KEY", required=True),
            password_env,
            insecure,
        ), about="Sign the manifest digest IMAGE (docker://REGISTRY/REPO:TAG) names in its registry, and push the "
                 "signature under REPO:sha256-HEX.sig as cosign does, next to those already there."),
        Verb("verify", "check an image's signatures in its registry", "IMAGE", (
            Option("--key", VALUE, "the public key (PEM)", "PUB", required=True),
            insecure,
        ), about="Exit 0 when a signature of IMAGE's manifest digest verifies with PUB (cosign's format); "
                 "exit 13 with one line otherwise."),
    )

    image_arg = ("IMAGE: a stored reference, a directory rootfs or a squashfs file; its packages are read from its "
                 "own databases (dpkg, apk, rpm's sqlite rpmdb, Python dist-info/egg-info).")
    feed = "FEED: a directory or zip of OSV JSON records (a site's offline mirror)."
    audit_verbs = (
        Verb("sbom", "print an image's software bill of materials", "IMAGE", (
            Option("--format", VALUE, "the SBOM's format", "spdx-json|cyclonedx-json",
                   choices=("spdx-json", "cyclonedx-json"), required=True),
        ), about=image_arg + "  The time written is now, or $SOURCE_DATE_EPOCH when set.  See docs/trust.md."),
        Verb("scan", "check an image's packages against an offline OSV feed", "IMAGE", (
            Option("--db", VALUE, "the feed", "FEED", required=True),
            json_flag,
            Option("--fail-on", VALUE, "exit 1 when a finding is at or above this severity",
                   "UNKNOWN|LOW|MEDIUM|HIGH|CRITICAL", choices=("UNKNOWN", "LOW", "MEDIUM", "HIGH", "CRITICAL")),
        ), about=image_arg + "  " + feed + "  A stored image's scan is recorded in the store, where the site's "
                 "refuse_scan_severity rule finds it.  Exit 0, or 1 with --fail-on.  See docs/trust.md."),
        Verb("diff", "compare the packages of two images", "IMAGE1 IMAGE2", (
            Option("--db", VALUE, "also list the advisories the change fixed (and brought)", "FEED"),
            json_flag,
        ), about="Packages added, removed, upgraded and downgraded from IMAGE1 to IMAGE2, each ecosystem's version "
                 "order deciding which is newer.  " + feed),
    )

    # The tools room (tools/): questions about containers, answered with `mesobox exec` in child processes.
    report_options = (
        Option("--json", VALUE, "write the results as JSON (-: to stdout, instead of the table)", "FILE"),
        Option("--html", VALUE, "write a self-contained HTML report (inline CSS and SVG)", "FILE"),
    )
    tool_verbs = (
        Verb("matrix", "run one test command in each of several images", "IMAGE... -- CMD [ARGS...]", (
            Option("-j --jobs", VALUE, "images run at once; default: min(images, CPUs); with --slurm: the job "
                   "array's throttle (%N), default none", "N"),
            Option("--timeout", VALUE, f"kill an image's run after DURATION ({SECONDS}); it counts as failed",
                   "DURATION"),
            Option("--slurm", FLAG, "one Slurm job array (sbatch --array --wait), a task per image"),
            Option("--sbatch-arg", LIST, "an sbatch option for the job array (repeatable), e.g. "
                   "--sbatch-arg=--partition=debug", "ARG", field="sbatch_arg"),
            *report_options,
        ), inherit=EXEC, about="Runs `mesobox exec [EXEC-OPTIONS] IMAGE CMD...` for every IMAGE and prints pass "
           "(exit 0) or fail, the exit code, the wall time and the first lines of output of each.  Exit 0 when "
           "every image passed, else 1.  See docs/tools.md."),
        Verb("bench", "time a command in a container against the host", "IMAGE -- CMD [ARGS...]", (
            Option("-n --runs", VALUE, "timed runs per side; default: 10", "N"),
            Option("--warmup", VALUE, "rounds run first and not counted; default: 1", "K"),
            *report_options,
        ), inherit=EXEC, about="Runs CMD in the container (`mesobox exec [EXEC-OPTIONS] IMAGE CMD...`) and on "
           "the host, interleaved, the side that goes first alternating; prints min, median, MAD and a confidence "
           "interval of the median per side, and the container/host ratio; records kernel, CPU, governor, image "
           "digest, mesobox version and binds.  See docs/tools.md."),
    )

    help_verb = Verb("help", "show a verb's help", "[VERB [SUBVERB]]")
    completion = Verb("completion", "print the shell completion script", "SHELL",
                      about="SHELL: bash or zsh.  scripts/setup-host.sh installs both.")
    manpage = Verb("manpage", "print a man page (roff)", "[VERB]", (
        Option("--list", FLAG, "print the verbs that have a page of their own, one a line"),
    ), about="Without VERB: mesobox(1); with it: mesobox-VERB(1).")

    every = (RUN, EXEC, SHELL, *image_verbs, instance, checkpoint, restore, srun, sbatch, bundle, oci, slurm,
             overlay, *trust_verbs, *audit_verbs, *tool_verbs, help_verb, completion,
             manpage)

    # Options before the verb: `mesobox --debug run ...`.
    top = Verb("", "Unprivileged containers for HPC centres.", "VERB [ARGS...]", (
        Option("--debug", FLAG, "print a traceback with an error, and the plan of a launch (also: MESOBOX_DEBUG=1)"),
        Option("--version", FLAG, "print the version"),
    ), stop_at_args=True)
    return every, top


def find(path: str) -> Verb | None:
    """``"run"``, ``"instance start"`` (or ``""``, mesobox itself) → its Verb."""
    words = path.split()
    verb = next((v for v in verbs() if v.name == words[0]), None) if words else toplevel()
    for word in words[1:]:
        verb = verb.subverb(word) if verb is not None else None
    return verb


def arity(verb: Verb) -> tuple[list[str], int | None]:
    """The arguments a verb needs, and how many it takes at most (None: no limit)."""
    words = verb.args.replace("[--]", "").split()
    needed = [w.rstrip(".") for w in words if not w.startswith("[") and w.isupper()]
    unbounded = any(w.endswith("...") or w.endswith("...]") for w in words)
    return needed, None if unbounded else len(words)


def synopsis(verb: Verb) -> str:
    """``mesobox run [OPTIONS] IMAGE [ARGS...]``"""
    words = ["mesobox", verb.path] if verb.path else ["mesobox"]
    if verb.options:
        words.append("[OPTIONS]")
    inherited = f"[{verb.inherit.name.upper()}-OPTIONS]" if verb.inherit is not None else ""
    if inherited and inherited not in verb.args.split():
        words.append(inherited)
    if verb.subverbs:
        words.append("VERB [ARGS...]")
    elif verb.args:
        words.append(verb.args)
    return " ".join(words)


def _error(message: str, hint: str | None = None) -> UsageError:
    from mesobox.errors import UsageError

    return UsageError(message, hint=hint)


def parse(verb: Verb, argv: Sequence[str], check: bool = True) -> tuple[dict[str, Any], list[str]]:
    """argv → ({field: value}, arguments), or ``({"help": True}, [])`` for -h/--help.

    A flag is True, a value its text, an optional value "" when given bare, a list
    option the tuple of its values; inherited options are kept as typed, in order, under
    INHERITED.  ``check``: required options and the number of arguments too."""
    index = verb.index()
    values: dict[str, Any] = {}
    lists: dict[str, list[str]] = {}
    args: list[str] = []
    argv = list(argv)
    i, count = 0, len(argv)
    while i < count:
        word = argv[i]
        start = i
        i += 1
        if word == "--":
            args += argv[i:]
            break
        if not word.startswith("-") or word == "-" or (not verb.stop_at_args and word[1:].isdigit()):
            if verb.stop_at_args:
                args += argv[start:]
                break
            args.append(word)
            continue
        if word in HELP_NAMES:
            return {"help": True}, []
        if word.startswith("--"):
            name, eq, value = word.partition("=")
        else:
            name, value = word[:2], word[2:]
            eq = "=" if value else ""
        found = index.get(name)
        if found is None:
            hint = f"mesobox {verb.path} --help lists the options".replace("  ", " ")
            raise _error(f"unknown option {word}", hint)
        opt, own = found
        if opt.kind == FLAG and eq and not word.startswith("--"):
            letters = [f"-{c}" for c in word[1:]]
            if all(index.get(w, (None,))[0] is not None and index[w][0].kind == FLAG for w in letters):
                argv[start : start + 1] = letters  # -it: bundled flags, as getopt takes them
                i, count = start, len(argv)
                continue
        if opt.kind == FLAG and eq:
            raise _error(f"{name} takes no value")
        if opt.takes_value and not eq:
            if i >= count:
                raise _error(f"{name} needs a value")
            value = argv[i]
            i += 1
        if not own:
            lists.setdefault(INHERITED, []).extend(argv[start:i])
        elif opt.choices and value not in opt.choices:
            raise _error(f"bad {name} value {value!r}", f"one of: {', '.join(opt.choices)}")
        elif opt.kind == FLAG:
            values[opt.field] = True
        elif opt.kind == LIST:
            lists.setdefault(opt.field, []).append(value)
        else:
            values[opt.field] = value
    values.update({k: tuple(v) for k, v in lists.items()})
    if check:
        _check(verb, values, args)
    return values, args


def _check(verb: Verb, values: dict[str, Any], args: list[str]) -> None:
    for opt in verb.options:
        if opt.required and opt.field not in values:
            raise _error(f"{verb.path} needs {opt.names[-1]} {opt.metavar}", f"usage: {synopsis(verb)}")
    needed, most = arity(verb)
    if len(args) < len(needed):
        raise _error(f"{verb.path} needs {' and '.join(needed)}", f"usage: {synopsis(verb)}")
    if most is not None and len(args) > most:
        raise _error(f"{verb.path}: unexpected argument {args[most]!r}", f"usage: {synopsis(verb)}")
