"""podiam agent: answers the EC2 metadata API for the pods on its node (not yet built)."""
