"""OCI room: the runtime spec, the one model between "what to run" and "how to run it",
and bundles (``config.json`` + rootfs) as the OCI runtime spec and Slurm's
``srun --container`` use them.
"""
