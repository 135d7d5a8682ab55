"""Generated gRPC code for kiam.KiamService; regenerate with ``python -m protos.generate``."""
