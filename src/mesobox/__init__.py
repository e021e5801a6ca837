"""mesobox: unprivileged OCI containers for HPC centres.

Rooms: ``image`` (reference → registry/archive → content store → layers → rootfs or
squashfs), ``runtime`` (OCI-shaped spec → launcher → exec), ``slurm`` and ``cli``.
This module stays empty of imports: ``mesobox run`` starts once per MPI rank.
"""

__version__ = "0.1.0"
