"""The online ReID service: a Ray Serve application over one gallery index directory.

Three deployments (see ``app``): an HTTP ingress (FastAPI) that validates requests, an
**embedder** that batches query/enrolment images across requests (``@serve.batch``)
through the exported safetensors model, and a **gallery** that searches, enrols and
deletes through ``reidscale.index.gallery.Gallery``, whose on-disk generations make every
acknowledged write survive a restart.

Modules: ``config`` (the dataclass config), ``schema`` (HTTP bodies and the checks on
them, no Ray), ``openset`` (where the is-new threshold comes from), ``gallery`` and
``embedder`` (the two deployments and the plain functions under them), ``app`` (ingress,
application builder, ``run`` for ``jobs/serve.py``).
"""
