"""Instances room: long-lived containers (cloud mode).

``state`` keeps each instance's record under the runtime dir, ``supervisor`` is the
process that stays with it, ``pause`` freezes and thaws it, ``nsenter`` runs a command
inside it, ``checkpoint`` saves and restores it (CRIU where the kernel allows, else
the writable layer only).
"""
