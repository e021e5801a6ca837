"""Launch room: a spec becomes a running container.

The path, in the order data flows: ``specbuild`` (image config + options → ``oci.spec.Spec``)
→ ``mountplan`` (the spec's mounts → ordered ``mountops.MountOp`` steps) → ``program``
(every decision, as one typed ``Program`` record) → ``launcher`` (supervise or not) →
``execute`` (namespaces, mounts, pivot_root, exec), with ``syscalls`` (libc through
ctypes) as the leaf.  ``execute.reap_stale_mounts`` and ``execute.check_ids`` are the steps every launch takes
first; ``plancache`` replays a saved program; ``probe`` is the only way
the compile step reads the host, so the cache knows what a program depends on.
Everything here is stdlib-only with lazy imports: it runs once per MPI rank.
"""
