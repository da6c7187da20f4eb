"""Machinery of the local transformers backend (:class:`polytask.backends.transformers.TransformersBackend`).

Modules: :mod:`.model` (finding / converting / loading a model offline), :mod:`.grammar` (compiled JSON-schema
grammars), :mod:`.engine` (the batched decode loop; its parts in :mod:`.batcher`, :mod:`.bucket`, :mod:`.rows`,
:mod:`.cache`, :mod:`.jobs`), :mod:`.queue` (the calls waiting for the engine thread). Importing this package
imports nothing heavy; the modules import torch.
"""
