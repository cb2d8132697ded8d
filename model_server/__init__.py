"""NexusML model server: loads the latest recorded weights and runs batched inference.

Not built yet: it arrives with the data-plane issue. Only the package exists so the
distribution's layout matches the contract.
"""
