"""vfsroot test suite: tests/fs (FUSE views), tests/disk (client disks), tests/tftpd, tests/e2e."""
