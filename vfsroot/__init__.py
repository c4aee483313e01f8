"""vfsroot: every network-boot client sees its own read-only boot tree.

Data flows one way (see docs/architecture.md):
source root -> layers -> client view -> FUSE operations -> /run/vfsroot/<ip>/ -> tftpd -> UDP.
"""

__version__ = "0.1.0"
