"""Attacks on the product promise: no path, symlink or packet lets one client read another
client's files or anything outside its view; bad input never takes a daemon down."""
