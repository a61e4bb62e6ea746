"""Tandem's decoding layer: models, runners, sampling, the speculative step and the engine.

Nothing here imports gRPC or generated protobuf code; ``service/`` converts to and from these
plain Python objects.
"""
