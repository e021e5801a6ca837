"""mesobox: unprivileged OCI containers for HPC centres.

Rooms: ``image`` (reference → registry/archive → content store → layers → rootfs or
squashfs), ``oci`` (the spec model, bundles), ``launch`` (spec → mount plan → program
→ launcher → execute), ``isolation``, ``instances``, ``slurm`` and ``cli``
(docs/architecture.md is the map).
This module stays empty of imports: ``mesobox run`` starts once per MPI rank.
"""

__version__ = "0.1.0"
