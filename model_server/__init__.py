"""NexusML model server: loads the latest recorded weights and runs batched inference.

    NEXUS_META=.nexus_meta.json nexus-model-server      # or: python -m model_server

Modules, in the order a request meets them: ``settings`` (every NEXUS_* variable),
``app`` (routes), ``codec`` (JSON <-> arrays), ``runner`` (the device queue),
``manager`` (which model serves; reload), ``loading`` (metadata -> verified weights ->
module on the device), ``metrics``; ``demo`` holds the demo networks and factories.
"""
