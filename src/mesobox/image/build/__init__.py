"""``mesobox build``: a Dockerfile → an image in the store, as an ordinary user.

Steps, one module each::

    dockerfile   parse: directives, continuations, stages, instructions, ``$VAR`` words
    context      the build context: .dockerignore, COPY/ADD sources, their content hashes
    userns       run a function as root in a user namespace that maps the caller's sub-ids
    changes      a changeset directory (overlay upper format) → a reproducible layer tar;
                 the same changeset applied to the stage's rootfs
    runstep      RUN through the launch engine (--fakeroot ids, an overlay on the rootfs)
    cache        step keys → the layer and config they made
    commit       blobs, manifest, image record and flattened form into the store, as a pull
    builder      the stages and their instructions, in order, with the cache

Not on the ``mesobox run`` path: nothing here is imported by a launch.
"""
