"""NexusML batching proxy: gathers requests into batches in front of the model servers.

Follow one request down the modules: ``routes`` (HTTP, bodies, auth, errors) ->
``v2`` (Open Inference Protocol codec) -> ``service`` (the proxy as one object) ->
``batcher`` (pure asyncio: queue, batches, futures) -> ``backends`` (the pooled client
to the model servers, readiness, limits). ``settings`` reads the environment,
``metrics`` counts, ``app`` and ``__main__`` run it standalone, ``registration`` puts it
in etcd. No torch and no model server imports here: the proxy is light and model-agnostic.
"""
