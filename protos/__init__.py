"""Generated gRPC code for kiam.KiamService; regenerate with ``python -m protos.generate``."""

# Beside the messages, one piece of the wire contract lives here: the trailing metadata key in
# which a refused unary RPC names the policy rule that refused it (the node stream carries the
# same word in PodState.reason). kiam agents ignore it.
REASON_METADATA = "podiam-reason"
