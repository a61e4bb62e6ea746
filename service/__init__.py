"""Tandem's gRPC service layer. Converts protobuf to the decoding layer's plain objects and back;
never imports torch."""
