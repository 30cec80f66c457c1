"""Headless PyBullet worlds built from a robot target, as gymnasium environments."""
