"""Machinery of the local transformers backend (:class:`polytask.backends.transformers.TransformersBackend`).

Modules: :mod:`.model` (finding / converting / loading a model offline), :mod:`.grammar` (compiled JSON-schema
grammars), :mod:`.engine` (the batched decode loop). Importing this package imports nothing heavy; the modules
import torch.
"""
