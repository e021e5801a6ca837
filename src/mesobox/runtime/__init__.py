"""Runtime room: turn an image and CLI options into a running, unprivileged container.

Data flows one way (docs/running.md): ``build`` (image config + options → ``spec.Spec``)
→ ``launcher`` (validate, namespaces, ``mounts`` plan, pivot_root, exec).  ``syscalls``
is the only ctypes user besides ``seccomp``; ``identity`` makes id maps and
passwd/group, ``environ`` merges environments, ``squashmount`` shares one squashfs
mount per node.  Everything on this path is stdlib-only with lazy imports: it runs
once per MPI rank.
"""
