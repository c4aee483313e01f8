"""End-to-end boots of real firmware, pairing with other TFTP servers, systemd units."""
