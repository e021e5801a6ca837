"""Isolation room: what limits a container beyond its own filesystem view.

``cgroups`` (memory, CPU, pids, I/O rates, v1 and v2), ``seccomp`` (the default and
Docker-format profiles, compiled with libseccomp), ``caps`` (capability names),
``network`` (loopback-only or slirp4netns), ``quota`` (a size-capped ext4 overlay).
The launch room calls these; none of them launches anything itself.
"""
