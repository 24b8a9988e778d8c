"""The HTTP wire contract of the gateway: paths and typed bodies, shared by server and clients."""
