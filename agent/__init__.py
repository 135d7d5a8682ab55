"""podiam agent: answers the EC2 metadata API for the pods on its node, with each pod's own
role's credentials, obtained from the podiam server over mutual-TLS gRPC."""
