"""The fat multi-robot policy: architecture, joint descriptors and checkpoint format."""
