"""The mutual-TLS material shared by the podiam agent and server.

``certs.authority`` makes a CA, a server certificate and an agent client certificate;
``certs.tls`` loads and validates them and turns them into gRPC credentials (with reload on
rotation on the server side); ``certs.check`` inspects a directory written by
``podiam-certs generate`` (or by anything else that uses the same file names).
"""
