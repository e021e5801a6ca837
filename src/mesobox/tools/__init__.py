"""Tools room: answers to a user's questions *about* containers, built on ``mesobox exec``.

``matrix`` runs one test command across many images (locally, N at a time, or as a
Slurm job array); ``bench`` times a command in a container against the same command
on the host, interleaved; ``stats`` holds the statistics (median, MAD, an
order-statistics confidence interval); ``report`` turns results into a terminal
table, JSON data and one self-contained HTML page with a hand-written SVG plot.

Off the launch path: nothing here is imported by ``mesobox run``; every container is
started as ``python -m mesobox exec`` in a child process, so what is measured or
tested is exactly what a user's job runs.  Stdlib only.
"""
