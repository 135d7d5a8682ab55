"""podiam server: watches pods and namespaces, decides which pod may have which IAM role, and
serves STS credentials to podiam agents over mutual-TLS gRPC."""
