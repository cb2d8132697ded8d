"""NexusML batching proxy: gathers requests into batches in front of the model server.

Not built yet: it arrives with the data-plane issue. Only the package exists so the
distribution's layout matches the contract.
"""
