"""Slurm integration: containers as the tasks of Slurm steps, and Slurm's OCI path.

Rooms:
- ``options``: splitting a ``mesobox srun`` command line into mesobox run options,
  srun options and the command (pure, no I/O).
- ``launch``: resolving the image once on the submit side and building the ``srun`` /
  ``sbatch`` command lines and batch scripts; the node-side task entry point.
- ``ociconf``: the oci.conf that makes mesobox Slurm's OCI runtime (bundles and the
  ``mesobox-oci`` state live in ``mesobox.oci.bundle`` and ``mesobox.oci.state``).
- ``hooks``: the site prolog/epilog (pre-stage a job's image, clean stale mounts).

Invariants: the image is resolved (and pulled, if needed) once, on the submit host,
never by every task; tasks are started by Slurm itself (``srun``), so they stay in the
job's cgroup and receive Slurm's signals; the node side uses the same interpreter and
the same ``mesobox`` as the submit side (``sys.executable -m mesobox``), so a venv
install works unchanged on the nodes of a shared filesystem.
"""
